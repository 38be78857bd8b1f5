"""The automatic balloon policy: every rule on a table of scenarios, and properties over
random snapshots (never under a floor, never inflating blind or under pressure, bounded
steps, settling on a steady input)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user_balloon.policy import (
    Direction,
    GuestStats,
    GuestView,
    HostView,
    Policy,
    PolicyConfig,
    Round,
    floor_bytes,
)

MiB = 1 << 20
GiB = 1 << 30
CONFIG = PolicyConfig(
    budget_bytes=2 * GiB, interval_s=10, step_bytes=128 * MiB, margin_bytes=256 * MiB,
    min_free_bytes=128 * MiB, min_free_percent=10,
)  # fmt: skip


def guest(
    vm: str = "a",
    *,
    ram: int = 2 * GiB,
    resident: int = GiB,
    target: int = 0,
    actual: int | None = None,
    available: int | None = GiB,
    age: float = 1.0,
    **more: object,
) -> GuestView:
    stats = None if available is None else GuestStats(available_bytes=available, total_bytes=ram)
    fields = {k: v for k, v in more.items() if k in {f.name for f in dataclasses.fields(GuestView)}}
    counters = {k: v for k, v in more.items() if k not in fields}
    if stats is not None and counters:
        stats = dataclasses.replace(stats, **counters)  # type: ignore[arg-type]
    return GuestView(
        vm, ram, resident, target, target if actual is None else actual, stats,
        None if stats is None else age, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


QUIET = HostView()


def decide(*guests: GuestView, host: HostView = QUIET, config: PolicyConfig = CONFIG) -> Round:
    return Policy(config).decide(host, guests)


# -- one rule each ----------------------------------------------------------------------
LOW_AVAILABLE = dataclasses.replace(CONFIG, host_min_available_bytes=512 * MiB)


@pytest.mark.parametrize(
    ("guests", "host", "config", "expect"),
    [
        # over budget by 512 MiB, 768 MiB asked (down to the bottom of the 256 MiB
        # band): the guest with the most to give first, all it can (b: 476 MiB
        # resident beyond the 548 MiB it uses), then a all it can (only the 88 MiB of
        # its MemAvailable that is resident: 1536 MiB resident, 2048 - 600 MiB in use)
        ([guest("a", resident=1536 * MiB, available=600 * MiB),
          guest("b", resident=1024 * MiB, available=1500 * MiB)], HostView(), CONFIG,
         {"a": (88 * MiB, "over_budget"), "b": (476 * MiB, "over_budget")}),
        # between budget - margin and the budget: nothing moves
        ([guest(resident=1900 * MiB, target=256 * MiB)], HostView(), CONFIG,
         {"a": (256 * MiB, "within_band")}),
        # room again: a guest less than half a step above its floor (205 MiB) gets a
        # step back
        ([guest(resident=GiB, target=300 * MiB, available=250 * MiB)], HostView(), CONFIG,
         {"a": (172 * MiB, "room")}),
        # ... one with memory to spare keeps its balloon: it is not asking for more
        ([guest(resident=GiB, target=300 * MiB)], HostView(), CONFIG,
         {"a": (300 * MiB, "not_needed")}),
        # ... and one whose statistics say nothing gets a step back
        ([guest(resident=GiB, target=300 * MiB, available=None)], HostView(), CONFIG,
         {"a": (172 * MiB, "room")}),
        # the host's own pressure (under budget): one step, as reclaimable allows
        ([guest(resident=1536 * MiB)], HostView(psi_some_avg10=30.0), CONFIG,
         {"a": (128 * MiB, "host_pressure")}),
        ([guest(resident=1536 * MiB)], HostView(mem_available_bytes=100 * MiB), LOW_AVAILABLE,
         {"a": (128 * MiB, "host_pressure")}),
        ([guest(resident=1536 * MiB)], HostView(mem_available_bytes=100 * MiB), CONFIG,
         {"a": (0, "within_band")}),
        # free memory the guest reported already is not resident: nothing to take
        ([guest(resident=1024 * MiB)], HostView(psi_some_avg10=30.0), CONFIG,
         {"a": (0, "nothing_to_reclaim")}),
        # stale or missing statistics: never inflated
        ([guest(resident=3 * GiB, age=31.0)], HostView(), CONFIG,
         {"a": (0, "stale_statistics")}),
        ([guest(resident=3 * GiB, available=None)], HostView(), CONFIG,
         {"a": (0, "stale_statistics")}),
        # a guest under its floor is deflated at once, even while the host is short:
        # back to its floor plus a step (205 + 128 - 150 MiB), at least a step
        ([guest(resident=3 * GiB, target=512 * MiB, available=150 * MiB)], HostView(), CONFIG,
         {"a": (512 * MiB - (floor_bytes(2 * GiB, CONFIG) + 128 * MiB - 150 * MiB),
                "guest_below_floor")}),
        # never past RAM minus min_memory
        ([guest(resident=3 * GiB, available=2 * GiB, target=GiB, min_memory_bytes=900 * MiB)],
         HostView(), CONFIG, {"a": (1148 * MiB, "over_budget")}),
        # opted out and pinned VMs are left alone
        ([guest(resident=3 * GiB, opted_out=True)], HostView(), CONFIG, {"a": (0, "opted_out")}),
        ([guest(resident=GiB, target=GiB, pinned=True)], HostView(), CONFIG,
         {"a": (GiB, "pinned")}),
        # what a guest can give now is its actual plus its reclaimable, no more
        ([guest(resident=3 * GiB, target=400 * MiB, actual=100 * MiB, available=300 * MiB)],
         HostView(), CONFIG, {"a": (400 * MiB, "nothing_to_reclaim")}),
    ],
    ids=["over_budget", "within_band", "room", "room_not_needed", "room_blind", "host_psi",
         "host_low_available",
         "host_available_unset", "reported_already", "stale", "no_stats", "below_floor",
         "min_memory", "opted_out", "pinned", "behind_target"],
)  # fmt: skip
def test_rule(
    guests: list[GuestView], host: HostView, config: PolicyConfig, expect: dict[str, object]
) -> None:
    out = decide(*guests, host=host, config=config)
    assert {d.vm: (d.target_bytes, d.reason) for d in out.decisions} == expect


def test_need_limits_the_step_and_budget_met_holds_the_rest() -> None:
    out = decide(guest("a", resident=1100 * MiB, available=1500 * MiB),
                 guest("b", resident=1000 * MiB, available=1400 * MiB))  # fmt: skip
    # over by 52 MiB, 308 asked (down to the bottom of the band): a gives it, b need not
    assert [(d.vm, d.target_bytes, d.reason) for d in out.decisions] == [
        ("a", 308 * MiB, "over_budget"), ("b", 0, "budget_met")]  # fmt: skip
    assert out.shortfall_bytes == 0 and out.host_short


def test_a_budget_that_floors_forbid_is_a_shortfall_not_forced() -> None:
    out = decide(guest("a", resident=3 * GiB, available=600 * MiB))
    # 1 GiB over; the guest can give 600 MiB less its floor and a step, all at once
    giveable = 600 * MiB - floor_bytes(2 * GiB, CONFIG) - CONFIG.step_bytes
    assert out.decisions[0].target_bytes == giveable
    assert out.shortfall_bytes == GiB - giveable
    # nothing at all to give: held, and the whole excess is the shortfall
    out = decide(guest("a", resident=3 * GiB, available=300 * MiB))
    assert (out.decisions[0].target_bytes, out.decisions[0].reason) == (0, "nothing_to_reclaim")
    assert out.shortfall_bytes == GiB


@pytest.mark.parametrize(
    ("counter", "value", "reason"),
    [("swap_in_bytes", 4096, "guest_swap_in"), ("alloc_stalls", 1, "guest_alloc_stalls"),
     ("oom_kills", 1, "guest_oom_kill"), ("major_faults", 5000, "guest_major_faults")],
)  # fmt: skip
def test_rising_pressure_counters_deflate_at_once(counter: str, value: int, reason: str) -> None:
    policy = Policy(CONFIG)
    quiet = guest(resident=3 * GiB, target=512 * MiB)
    policy.decide(HostView(), [quiet])
    rising = guest(resident=3 * GiB, target=512 * MiB, **{counter: value})
    (d,) = policy.decide(HostView(), [rising]).decisions
    assert (d.target_bytes, d.reason, d.direction) == (384 * MiB, reason, Direction.DEFLATE)
    # under pressure with nothing in the balloon: held, never inflated
    policy.decide(HostView(), [guest(resident=3 * GiB)])
    (d,) = policy.decide(HostView(), [guest(resident=3 * GiB, **{counter: 2 * value})]).decisions
    assert (d.target_bytes, d.reason) == (0, reason)


def test_major_faults_under_the_threshold_are_normal() -> None:
    policy = Policy(CONFIG)
    policy.decide(HostView(), [guest(resident=3 * GiB, target=512 * MiB)])
    (d,) = policy.decide(
        HostView(), [guest(resident=3 * GiB, target=512 * MiB, major_faults=1500)]
    ).decisions
    assert d.direction is Direction.INFLATE


# -- properties ---------------------------------------------------------------------------
views = st.builds(
    guest,
    vm=st.sampled_from(["a", "b", "c", "d"]),
    ram=st.integers(256, 8192).map(lambda m: m * MiB),
    resident=st.integers(0, 8192).map(lambda m: m * MiB),
    target=st.integers(0, 4096).map(lambda m: m * MiB),
    available=st.one_of(st.none(), st.integers(0, 8192).map(lambda m: m * MiB)),
    age=st.floats(0, 100),
    free_bytes=st.integers(0, 8192).map(lambda m: m * MiB),
    swap_in_bytes=st.integers(0, 10),
    alloc_stalls=st.integers(0, 10),
)
hosts = st.builds(HostView, st.one_of(st.none(), st.integers(0, 64 * GiB)),
                  st.one_of(st.none(), st.floats(0, 100)))  # fmt: skip
snapshots = st.lists(views, min_size=1, max_size=4, unique_by=lambda g: g.vm)


@given(first=snapshots, second=snapshots, host=hosts, budget=st.integers(0, 16 * 1024))
@settings(max_examples=300)
def test_never_under_a_floor_never_blind_never_more_than_allowed(
    first: list[GuestView], second: list[GuestView], host: HostView, budget: int
) -> None:
    config = dataclasses.replace(CONFIG, budget_bytes=budget * MiB)
    policy = Policy(config)
    for snapshot in (first, second):  # the second sees the first's counters
        out = policy.decide(host, snapshot)
        for g, d in zip(snapshot, out.decisions, strict=True):
            assert d.vm == g.vm
            assert d.target_bytes >= 0
            if d.direction is Direction.DEFLATE:  # a step, or back to floor + step
                lacking = (0 if g.stats is None else floor_bytes(g.ram_bytes, config)
                           + config.step_bytes - g.stats.available_bytes)  # fmt: skip
                assert g.target_bytes - d.target_bytes <= max(config.step_bytes, lacking)
            else:  # resident memory asked beyond free memory the host does not hold
                not_held = max(0, g.ram_bytes - g.resident_bytes - g.actual_bytes)
                free = 0 if g.stats is None else min(g.stats.free_bytes, not_held)
                start = max(g.target_bytes, g.actual_bytes + free)
                assert d.target_bytes - start <= config.max_reclaim_bytes
            if d.direction is Direction.INFLATE:
                assert g.stats is not None and g.stats_age_s is not None
                assert g.stats_age_s <= 3 * config.interval_s
                assert not d.reason.startswith("guest_")
                # what the guest gives beyond its current balloon keeps it at its floor
                given = d.target_bytes - g.actual_bytes
                assert g.stats.available_bytes - given >= floor_bytes(g.ram_bytes, config)
                assert d.target_bytes <= g.ram_bytes - g.min_memory_bytes


@given(snapshot=snapshots, budget=st.integers(0, 16 * 1024))
@settings(max_examples=300)
def test_a_steady_input_settles(snapshot: list[GuestView], budget: int) -> None:
    """The guests do as told (actual follows target, available and resident shrink by
    what they give) and nothing else changes: targets stop moving within a bounded
    number of intervals and never go back and forth."""
    config = dataclasses.replace(CONFIG, budget_bytes=budget * MiB)
    policy = Policy(config)
    guests = {g.vm: g for g in snapshot}
    history: dict[str, list[int]] = {vm: [g.target_bytes] for vm, g in guests.items()}
    for _ in range(80):
        out = policy.decide(HostView(), list(guests.values()))
        for d in out.decisions:
            g = guests[d.vm]
            moved = d.target_bytes - g.actual_bytes
            # a balloon fills from free memory the host does not hold first, then
            # from resident memory; deflating gives free memory
            not_held = max(0, g.ram_bytes - g.resident_bytes - g.actual_bytes)
            free = 0 if g.stats is None else min(g.stats.free_bytes, not_held)
            from_free = min(max(0, moved), free)
            stats = g.stats
            if stats is not None:
                stats = dataclasses.replace(
                    stats, available_bytes=max(0, stats.available_bytes - moved),
                    free_bytes=max(0, stats.free_bytes - from_free) if moved > 0
                    else stats.free_bytes - moved,
                )  # fmt: skip
            guests[d.vm] = dataclasses.replace(
                g, target_bytes=d.target_bytes, actual_bytes=d.target_bytes, stats=stats,
                resident_bytes=max(0, g.resident_bytes - max(0, moved - from_free)),
            )  # fmt: skip
            history[d.vm].append(d.target_bytes)
    for vm, targets in history.items():
        tail = targets[-10:]
        assert len(set(tail)) == 1, (vm, targets)
        # monotonic: no back and forth on a steady input
        steps = [b - a for a, b in itertools.pairwise(targets) if b != a]
        assert all(s > 0 for s in steps) or all(s < 0 for s in steps), (vm, targets)


def test_inflation_on_its_way_is_not_asked_for_again() -> None:
    # 200 MiB over, and 256 MiB asked of the guest that it has not given yet
    slow = guest(resident=2248 * MiB, target=256 * MiB, actual=0, available=1800 * MiB)
    (d,) = decide(slow, config=dataclasses.replace(CONFIG, margin_bytes=0)).decisions
    assert (d.target_bytes, d.reason) == (256 * MiB, "budget_met")


def test_a_balloon_counted_in_memtotal_is_not_taken_for_memory_in_use() -> None:
    # DEFLATE_ON_OOM: MemTotal keeps the 512 MiB balloon. 600 MiB resident; the guest
    # uses 2048 - 512 (balloon) - 1200 (available) = 336 MiB: 264 MiB can be given,
    # and all of it is asked for (344 MiB over).
    view = guest(resident=600 * MiB, target=512 * MiB, available=1200 * MiB)
    budget = dataclasses.replace(CONFIG, budget_bytes=256 * MiB)
    (d,) = decide(dataclasses.replace(view, balloon_in_total=True), config=budget).decisions
    assert (d.target_bytes, d.reason) == (776 * MiB, "over_budget")
    # Read as if MemTotal had shrunk, the balloon would look like 848 MiB in use.
    (d,) = decide(view, config=budget).decisions
    assert (d.target_bytes, d.reason) == (512 * MiB, "nothing_to_reclaim")


# -- free memory the host does not hold, the excess shared, shares ----------------------
def test_free_memory_the_host_does_not_hold_is_taken_in_the_same_decision() -> None:
    # A guest of 2 GiB, 1313 MiB resident (1200 MiB of cache), 640 MiB free and
    # already given back. 200 MiB over, 456 asked (down to the bottom of the band):
    # the balloon takes the 640 MiB of free memory first, which frees nothing, so the
    # target asks 640 + 456 MiB at once.
    config = dataclasses.replace(CONFIG, budget_bytes=1113 * MiB)
    a = guest(resident=1313 * MiB, available=1800 * MiB, free_bytes=640 * MiB)
    (d,) = decide(a, config=config).decisions
    assert (d.target_bytes, d.reason) == ((640 + 456) * MiB, "over_budget")
    # Half of it done (free memory taken, nothing resident yet): nothing asked again.
    half = guest(resident=1313 * MiB, target=1096 * MiB, actual=480 * MiB,
                 available=1320 * MiB, free_bytes=160 * MiB)  # fmt: skip
    (d,) = decide(half, config=config).decisions
    assert (d.target_bytes, d.reason) == (1096 * MiB, "budget_met")


def test_free_memory_alone_is_no_reason_to_inflate() -> None:
    # An idle guest: all its free memory went back already, nothing resident to give.
    idle = guest(resident=100 * MiB, available=1900 * MiB, free_bytes=1850 * MiB)
    (d,) = decide(idle, config=dataclasses.replace(CONFIG, budget_bytes=50 * MiB)).decisions
    assert (d.target_bytes, d.reason) == (0, "nothing_to_reclaim")


@pytest.mark.parametrize(
    ("over_mib", "expect_mib"),
    [
        # the cache holder covers the excess (and the band's 256 MiB) alone: the small
        # guests are not moved
        (100, {"cache": 356, "small1": 0, "small2": 0}),
        # more than one VM may give in an interval: the cache holder gives its most
        # (max_reclaim), the next in line all they can
        (700, {"cache": 512, "small1": 112, "small2": 200}),
    ],
)
def test_the_excess_is_shared_from_the_guests_that_can_give_most(
    over_mib: int, expect_mib: dict[str, int]
) -> None:
    guests = [
        guest("cache", resident=1500 * MiB, available=1800 * MiB),  # 1252 MiB giveable
        guest("small1", resident=300 * MiB, available=1860 * MiB),  # 112 MiB
        guest("small2", resident=400 * MiB, available=1848 * MiB),  # 200 MiB
    ]
    resident = sum(g.resident_bytes for g in guests)
    config = dataclasses.replace(CONFIG, budget_bytes=resident - over_mib * MiB)
    out = decide(*guests, config=config)
    assert {d.vm: d.target_bytes // MiB for d in out.decisions} == expect_mib


def test_more_shares_give_later() -> None:
    twins = [guest("a", resident=1500 * MiB, available=1800 * MiB),
             guest("b", resident=1500 * MiB, available=1800 * MiB)]  # fmt: skip
    config = dataclasses.replace(CONFIG, budget_bytes=2800 * MiB)  # 200 MiB over
    out = decide(twins[0], dataclasses.replace(twins[1], shares=500), config=config)
    assert {d.vm: d.target_bytes // MiB for d in out.decisions} == {"a": 0, "b": 456}
    out = decide(dataclasses.replace(twins[0], shares=2000), twins[1], config=config)
    assert {d.vm: d.target_bytes // MiB for d in out.decisions} == {"a": 0, "b": 456}


def test_a_guest_that_needed_memory_lately_keeps_room_for_it() -> None:
    config = dataclasses.replace(CONFIG, budget_bytes=2300 * MiB)
    policy = Policy(dataclasses.replace(config, budget_bytes=4 * GiB))  # room, at first
    # b used 1500 MiB a minute ago (available 548); now it uses 548 and holds cache
    busy = guest("b", resident=1600 * MiB, available=548 * MiB)
    idle_a = guest("a", resident=900 * MiB, available=1900 * MiB)
    policy.decide(QUIET, [idle_a, busy])
    policy.config = config  # the budget lowered (a reload)
    cached = guest("b", resident=1600 * MiB, available=1500 * MiB)
    # 200 MiB over: a cache holder without a recent peak gives, b keeps its room
    holder = guest("a", resident=900 * MiB, available=1800 * MiB)
    out = policy.decide(QUIET, [holder, cached])
    assert {d.vm: d.target_bytes // MiB for d in out.decisions} == {"a": 456, "b": 0}
    # nobody else can give: b's room is asked for after all
    out = policy.decide(QUIET, [guest("a", resident=900 * MiB, available=300 * MiB), cached])
    assert out.decisions[1].target_bytes > 0 and out.decisions[1].reason == "over_budget"


def test_growth_seen_in_two_intervals_is_asked_for_ahead() -> None:
    """The guest does as told, but its cache grows 300 MiB per interval: the third
    decision asks for that growth too; the second, which saw it once (it may have
    been a one-off jump, which the excess holds already), does not."""
    policy = Policy(CONFIG)
    target = 0
    asked = []
    for i in range(3):
        resident = 2 * GiB + 100 * MiB + 300 * MiB * i - target
        g = guest(resident=resident, target=target, available=1800 * MiB)
        (d,) = policy.decide(QUIET, [g]).decisions
        asked.append((d.target_bytes - target) // MiB)
        target = d.target_bytes
    # over by 100 MiB: 356 asked (down to the bottom of the band); over by 44: 300;
    # over by 44 again: 300 and the 300 it grew, capped by max_reclaim
    assert asked == [356, 300, 512], asked


def test_a_guest_taking_memory_now_is_not_inflated_until_its_statistics_catch_up() -> None:
    """Its resident bytes rose by 900 MiB since the last decision, and its statistics
    (from before) still count that as available: it is left alone this interval."""
    policy = Policy(dataclasses.replace(CONFIG, budget_bytes=512 * MiB))
    policy.decide(QUIET, [guest(resident=100 * MiB, available=1900 * MiB)])
    rising = guest(resident=1000 * MiB, available=1900 * MiB, free_bytes=1000 * MiB)
    (d,) = policy.decide(QUIET, [rising]).decisions
    assert (d.target_bytes, d.reason) == (0, "growing")
    # the next interval, no longer rising: its (fresh) statistics are believed
    (d,) = policy.decide(QUIET, [guest(resident=1000 * MiB, available=1500 * MiB)]).decisions
    assert d.direction is Direction.INFLATE
