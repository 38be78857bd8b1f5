"""Prometheus metrics: the names (README "Metrics") are a contract; keep them.

One registry (injected, so tests get their own), one prefix, base units, ``_total``
on counters, and labels from bounded sets only: ``vm`` (from the configuration),
``order`` (0 to MAX_REPORT_ORDER), ``reason`` (fixed slugs). Guest RAM sizes are read
at scrape time by a custom collector, so what Prometheus sees is what the host holds
at that moment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vhost_user_balloon import __version__
from vhost_user_balloon.protocol import GUEST_PAGE_SIZE, BalloonStat

from .totals import CounterChild, Totals, add

__all__ = [
    "GUEST_STAT_METRICS",
    "PREFIX",
    "LatestGuestStats",
    "Metrics",
    "VmMemoryStats",
    "VmMetrics",
]

PREFIX = "vhost_user_balloon"


@dataclass(frozen=True, slots=True)
class VmMemoryStats:
    ram_bytes: int
    resident_bytes: int


class _GuestRamCollector(Collector):
    def __init__(self, snapshot: Callable[[], Mapping[str, VmMemoryStats]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ram = GaugeMetricFamily(
            f"{PREFIX}_guest_ram_bytes",
            "Guest RAM mapped from the frontend, in bytes (0 while no guest is attached).",
            labels=["vm"],
        )
        resident = GaugeMetricFamily(
            f"{PREFIX}_guest_ram_resident_bytes",
            "Host memory the guest RAM files hold now (their allocated blocks), in bytes.",
            labels=["vm"],
        )
        for vm, stats in sorted(self._snapshot().items()):
            ram.add_metric([vm], stats.ram_bytes)
            resident.add_metric([vm], stats.resident_bytes)
        yield ram
        yield resident


#: How each stats tag is exported: name (after the prefix), counter or gauge, help.
#: Counters are cumulative in the guest since its boot (Prometheus handles the reset
#: when it reboots); gauges are levels.
GUEST_STAT_METRICS: dict[int, tuple[str, str, str]] = {
    BalloonStat.SWAP_IN: ("guest_swap_in_bytes", "counter", "Bytes the guest swapped in."),
    BalloonStat.SWAP_OUT: ("guest_swap_out_bytes", "counter", "Bytes the guest swapped out."),
    BalloonStat.MAJFLT: ("guest_major_faults", "counter", "Major page faults in the guest."),
    BalloonStat.MINFLT: ("guest_minor_faults", "counter", "Minor page faults in the guest."),
    BalloonStat.MEMFREE: ("guest_memory_free_bytes", "gauge", "Memory the guest has free."),
    BalloonStat.MEMTOT: ("guest_memory_total_bytes", "gauge", "Memory the guest can use."),
    BalloonStat.AVAIL: ("guest_memory_available_bytes", "gauge",
                        "The guest's estimate of memory available to new work."),
    BalloonStat.CACHES: ("guest_disk_caches_bytes", "gauge", "Guest page cache, in bytes."),
    BalloonStat.HTLB_PGALLOC: ("guest_hugetlb_allocations", "counter",
                               "Huge page allocations in the guest."),
    BalloonStat.HTLB_PGFAIL: ("guest_hugetlb_allocation_failures", "counter",
                              "Failed huge page allocations in the guest."),
    BalloonStat.OOM_KILL: ("guest_oom_kills", "counter", "OOM killer invocations in the guest."),
    BalloonStat.ALLOC_STALL: ("guest_allocation_stalls", "counter",
                              "Memory allocation stalls in the guest."),
    BalloonStat.ASYNC_SCAN: ("guest_async_scanned_pages", "counter", "Pages kswapd scanned."),
    BalloonStat.DIRECT_SCAN: ("guest_direct_scanned_pages", "counter",
                              "Pages scanned by direct reclaim."),
    BalloonStat.ASYNC_RECLAIM: ("guest_async_reclaimed_pages", "counter",
                                "Pages kswapd reclaimed."),
    BalloonStat.DIRECT_RECLAIM: ("guest_direct_reclaimed_pages", "counter",
                                 "Pages reclaimed by direct reclaim."),
}  # fmt: skip


class LatestGuestStats(Collector):
    """The latest statistics each guest sent, exported at scrape time."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[dict[int, int], float]] = {}

    def update(self, vm: str, pairs: Iterable[tuple[int, int]]) -> None:
        self._latest[vm] = (dict(pairs), time.monotonic())

    def clear(self, vm: str) -> None:
        self._latest.pop(vm, None)

    def latest(self, vm: str) -> tuple[dict[int, int], float] | None:
        """The guest's last statistics by tag and their age in seconds (None: none yet)."""
        found = self._latest.get(vm)
        return None if found is None else (dict(found[0]), time.monotonic() - found[1])

    def collect(self) -> Iterator[Metric]:
        families: dict[int, CounterMetricFamily | GaugeMetricFamily] = {}
        unknown = GaugeMetricFamily(
            f"{PREFIX}_guest_stat", "Statistics tags this daemon has no name for, by number.",
            labels=["vm", "tag"],
        )  # fmt: skip
        age = GaugeMetricFamily(
            f"{PREFIX}_guest_stats_age_seconds",
            "Seconds since the guest last sent statistics (grows if it stops answering).",
            labels=["vm"],
        )
        now = time.monotonic()
        for vm, (stats, when) in sorted(self._latest.items()):
            age.add_metric([vm], now - when)
            for tag, value in sorted(stats.items()):
                spec = GUEST_STAT_METRICS.get(tag)
                if spec is None:
                    unknown.add_metric([vm, str(tag)], value)
                    continue
                family = families.get(tag)
                if family is None:
                    name, kind, doc = spec
                    family = families[tag] = (
                        CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["vm"])
                        if kind == "counter"
                        else GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["vm"])
                    )
                family.add_metric([vm], value)
        yield from families.values()
        yield unknown
        yield age


class Metrics:
    """Every metric the daemon exports, registered in one ``CollectorRegistry``."""

    # A declaration table (each series its name, help and labels, as README "Metrics"
    # lists them): long by nature.
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        #: Held while a report is counted (in a discard thread) and while a scrape saves
        #: the totals and collects (in the event loop): so nothing is counted between
        #: the two, and a scrape never shows more than the next process starts from.
        self.lock = threading.Lock()
        r, ns = self.registry, PREFIX
        #: the series that go on across a restart under a keeper (totals.py)
        self.totals = Totals(ns)
        t = self.totals
        self.reported_blocks = t.counter(
            "reported_blocks",
            "Free page report entries received, by order = log2(entry bytes / 4 KiB), "
            "whatever the guest's page size (a 16 KiB-page arm64 guest's 32 MiB blocks "
            "are order 13).",
            ["vm", "order"],
        )  # fmt: skip
        self.reported_bytes = t.counter(
            "reported_bytes",
            "Bytes reported free by the guest, by order = log2(entry bytes / 4 KiB).",
            ["vm", "order"],
        )  # fmt: skip
        self.churn_checked_bytes = t.counter(
            "churn_checked_bytes",
            "Bytes given back for free page reports that were checked for churn once "
            "the window (10s, 60s) had passed since they were given back, by order and "
            "window. A sample: at most 16 reported blocks a second per VM are checked.",
            ["vm", "order", "window"],
        )  # fmt: skip
        self.churn_resident_bytes = t.counter(
            "churn_resident_bytes",
            "Of churn_checked_bytes, those the guest had taken again (allocated in its "
            "RAM file) at the end of the window: resident / checked is the share of "
            "reported memory the guest needed again (a lower bound).",
            ["vm", "order", "window"],
        )  # fmt: skip
        self.discarded_bytes = t.counter(
            "discarded_bytes",
            "Bytes given back to the host (holes punched in guest RAM): reported free "
            "pages and pages the guest put into the balloon (inflate).",
            ["vm"],
        )  # fmt: skip
        self.discard_skipped_bytes = t.counter(
            "discard_skipped_bytes",
            "Reported or inflated bytes not given back, by reason: poison, inhibited, "
            "vfio, unaligned, outside_ram, error.",
            ["vm", "reason"],
        )  # fmt: skip
        self.reports = t.counter(
            "reports", "Free page reports (descriptor chains) completed.",
            ["vm"],
        )  # fmt: skip
        self.report_entries = t.histogram(
            "report_entries", "Entries per free page report.", ["vm"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.report_service_seconds = t.histogram(
            "report_service_seconds",
            "Time from seeing a report's kick to writing its used entry, in seconds.",
            ["vm"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )  # fmt: skip
        self.connected = Gauge(
            "connected", "1 while a frontend (QEMU) is connected for this VM.",
            ["vm"], namespace=ns, registry=r,
        )  # fmt: skip
        self.protocol_errors = t.counter(
            "protocol_errors",
            "Protocol errors by reason; most close that VM's connection.",
            ["vm", "reason"],
        )  # fmt: skip
        self.connections_refused = t.counter(
            "connections_refused",
            "Frontend connections refused: vm_busy (one is already connected), "
            "peer_not_allowed (its uid/gid is not in the allow list).",
            ["vm", "reason"],
        )  # fmt: skip
        self.target_bytes = Gauge(
            "target_bytes",
            "Memory the daemon asks the guest to give up (the balloon's target size).",
            ["vm"], namespace=ns, registry=r,
        )  # fmt: skip
        self.actual_bytes = Gauge(
            "actual_bytes", "Memory the guest says is in the balloon now (its config's actual).",
            ["vm"], namespace=ns, registry=r,
        )  # fmt: skip
        self.balloon_inflated_bytes = t.counter(
            "balloon_inflated_bytes", "Memory the guest put into the balloon (inflate).",
            ["vm"],
        )  # fmt: skip
        self.balloon_deflated_bytes = t.counter(
            "balloon_deflated_bytes", "Memory the guest took back out of the balloon.",
            ["vm"],
        )  # fmt: skip
        self.negotiated_features = Gauge(
            "negotiated_features",
            "Virtio feature bits the guest driver accepted (a bitmask; 0 while detached). "
            "Bit 30, vhost-user's protocol-features bit between QEMU and the daemon, is "
            "never included: the guest does not see it.",
            ["vm"], namespace=ns, registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            "build_info", "Always 1; the version label says which build is running.",
            ["version"], namespace=ns, registry=r,
        )  # fmt: skip
        self.build_info.labels(version=__version__).set(1)
        self.start_time = Gauge(
            "start_time_seconds",
            "When this daemon process started, in Unix time. Counters start again from 0 "
            "in a new process unless a keeper carried the totals over.",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.start_time.set(time.time())
        self.adopted = t.counter(
            "connections_adopted", "Connections adopted from the process before this one "
            "(a restart under a keeper; QEMU noticed nothing).",
            ["vm"],
        )  # fmt: skip
        self.registry.register(self.totals)
        self.guest_stats = LatestGuestStats()
        self.registry.register(self.guest_stats)

    def export_totals_json(self) -> str:
        """``[sample name, labels, value]`` of every series that goes on across a
        restart (not the guest's own statistics: the guest sends those again), as JSON
        text; cheap when few series changed since the last."""
        return self.totals.export_json()

    def restore_totals(self, samples: object) -> int:
        """Add the totals a previous process exported to this process's (fresh) series,
        so that counters go on instead of starting again. Everything is checked first
        and nothing applied if anything is wrong (``ValueError``). Returns the number
        of series restored."""
        return self.totals.restore(samples)

    def for_vm(self, vm: str) -> VmMetrics:
        """The metrics of one VM with their label children bound once (the hot path)."""
        return VmMetrics(self, vm)

    def add_vm(self, vm: str) -> None:
        """Make a VM's series exist at 0 before anything happens, so rates start right."""
        self.connected.labels(vm=vm).set(0)
        self.reports.labels(vm=vm)
        self.discarded_bytes.labels(vm=vm)

    def watch_memory(self, snapshot: Callable[[], Mapping[str, VmMemoryStats]]) -> None:
        self.registry.register(_GuestRamCollector(snapshot))


class VmMetrics:
    """One VM's series, label children looked up once and cached: a report costs one
    ``inc`` per order present, not a ``labels()`` look-up per entry. Every update a VM's
    connection and its queues make goes through here (the daemon itself counts refused
    and adopted connections)."""

    def __init__(self, metrics: Metrics, vm: str) -> None:
        self._m, self.vm = metrics, vm
        self._orders: dict[int, tuple[CounterChild, CounterChild]] = {}
        self._skipped: dict[str, CounterChild] = {}
        self._errors: dict[str, CounterChild] = {}
        self.discarded = metrics.discarded_bytes.labels(vm=vm)
        self.inflated = metrics.balloon_inflated_bytes.labels(vm=vm)
        self.deflated = metrics.balloon_deflated_bytes.labels(vm=vm)
        self.reports = metrics.reports.labels(vm=vm)
        self.entries = metrics.report_entries.labels(vm=vm)
        self.service = metrics.report_service_seconds.labels(vm=vm)

    def set_connected(self, connected: bool) -> None:
        self._m.connected.labels(vm=self.vm).set(1 if connected else 0)

    def set_features(self, guest_features: int) -> None:
        self._m.negotiated_features.labels(vm=self.vm).set(guest_features)

    def set_balloon(self, target_pages: int, actual_pages: int) -> None:
        """The balloon's target and actual size, in 4 KiB pages (the config's units)."""
        self._m.target_bytes.labels(vm=self.vm).set(target_pages * GUEST_PAGE_SIZE)
        self._m.actual_bytes.labels(vm=self.vm).set(actual_pages * GUEST_PAGE_SIZE)

    def guest_stats(self) -> tuple[dict[int, int], float] | None:
        """The guest's last statistics by tag and their age in seconds (None: none yet)."""
        return self._m.guest_stats.latest(self.vm)

    def detached(self) -> None:
        """The VM's frontend went away: its levels are 0, its guest statistics gone."""
        self.set_connected(False)
        self.set_features(0)
        self.set_balloon(0, 0)
        self._m.guest_stats.clear(self.vm)

    def record_inflate(self, nbytes: int, discarded: int, skipped: Mapping[str, int]) -> None:
        """The guest put ``nbytes`` into the balloon; what of it was given back."""
        self.inflated.inc(nbytes)
        self.record_discard(discarded, skipped)

    def record_deflate(self, nbytes: int) -> None:
        self.deflated.inc(nbytes)

    def record_stats(self, pairs: Iterable[tuple[int, int]]) -> None:
        """The guest's latest statistics (exported at scrape time)."""
        self._m.guest_stats.update(self.vm, pairs)

    def protocol_error(self, reason: str) -> None:
        with self._m.lock:  # also counted from discard threads
            child = self._errors.get(reason)
            if child is None:
                child = self._errors[reason] = self._m.protocol_errors.labels(
                    vm=self.vm, reason=reason
                )
            child.inc()

    def record_report(
        self,
        by_order: Mapping[int, tuple[int, int]],
        discarded: int,
        skipped: Mapping[str, int],
        service_seconds: float,
    ) -> None:
        """``by_order``: order -> (blocks, bytes) of one report (counted in a discard
        thread: under the lock a scrape takes), all in one go."""
        counts: list[tuple[CounterChild, float]] = [(self.reports, 1)]
        entries = 0
        for order, (blocks, nbytes) in by_order.items():
            children = self._orders.get(order) or self._order(order)
            counts += ((children[0], blocks), (children[1], nbytes))
            entries += blocks
        counts += self._discards(discarded, skipped)
        with self._m.lock:
            add(counts, ((self.entries, entries), (self.service, service_seconds)))

    def _order(self, order: int) -> tuple[CounterChild, CounterChild]:
        children = self._orders[order] = (
            self._m.reported_blocks.labels(vm=self.vm, order=str(order)),
            self._m.reported_bytes.labels(vm=self.vm, order=str(order)),
        )
        return children

    def record_churn(self, order: int, window: str, checked: int, resident: int) -> None:
        """A sampled reported block, checked at the end of ``window``."""
        labels = {"vm": self.vm, "order": str(order), "window": window}
        counts = ((self._m.churn_checked_bytes.labels(**labels), checked),
                  (self._m.churn_resident_bytes.labels(**labels), resident))  # fmt: skip
        with self._m.lock:
            add(counts, ())

    def record_discard(self, discarded: int, skipped: Mapping[str, int]) -> None:
        """Bytes given back to the host, and the bytes that were not, by reason."""
        counts = self._discards(discarded, skipped)
        with self._m.lock:
            add(counts, ())

    def _discards(
        self, discarded: int, skipped: Mapping[str, int]
    ) -> list[tuple[CounterChild, float]]:
        counts: list[tuple[CounterChild, float]] = [(self.discarded, discarded)]
        for reason, n in skipped.items():
            child = self._skipped.get(reason)
            if child is None:
                child = self._skipped[reason] = self._m.discard_skipped_bytes.labels(
                    vm=self.vm, reason=reason
                )
            counts.append((child, n))
        return counts
