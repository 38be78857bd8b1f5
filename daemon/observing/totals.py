"""Counters and histograms that go on across a restart of the daemon.

Theory of operation. These series are ours, not prometheus_client's: each family
keeps its children in a dict keyed by label values, and ``Totals`` (a custom
collector) turns them into metric families at scrape time. That is what makes a
restart under a keeper simple: ``export`` writes every series as
``[sample name, labels, value]`` (histogram buckets cumulative, as Prometheus
exposes them) and the next process's ``restore`` adds them to its fresh series,
checked whole first, so a counter never goes below what Prometheus has seen.

A child is looked up once (``labels``) and kept by the hot path; ``inc`` and
``observe`` are plain additions (and forget the child's saved text), and ``add`` makes
a report's at once. A report is counted in the discard thread that served it, other
series in the event loop; the caller holds ``Metrics.lock`` where both may meet, and a
scrape takes it while it saves and collects.

Saving runs before every scrape, in the event loop, so it must stay cheap at hundreds
of VMs: ``export_json`` writes the same samples as ``export`` as JSON text, each
child's from a label prefix rendered once, and keeps that text until the child
changes. A scrape after which few series moved costs a join of strings.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, repeat

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["CounterChild", "CounterFamily", "HistogramChild", "HistogramFamily", "Totals", "add"]


def _prefix(name: str, labels: dict[str, str]) -> str:
    """``["name",{labels},`` : a saved sample up to its value, as JSON text."""
    return json.dumps([name, labels], separators=(",", ":"))[:-1] + ","


class CounterChild:
    """One counter series."""

    __slots__ = ("_prefix", "_text", "labels", "value")

    def __init__(self, prefix: str, labels: dict[str, str]) -> None:
        self.value = 0.0
        #: its labels, made once (the samples of every scrape share them, read only)
        self.labels = labels
        self._prefix = prefix
        self._text: str | None = None

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; inc({amount})")
        self.value += amount
        self._text = None

    def text(self) -> str:
        """This series as saved JSON text."""
        if self._text is None:
            self._text = f"{self._prefix}{self.value!r}]"
        return self._text


class HistogramChild:
    """One histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = (
        "_prefixes", "_samples", "_text", "bounds", "bucket_labels", "counts", "labels", "sum",
    )  # fmt: skip

    def __init__(
        self,
        bounds: tuple[float, ...],
        prefixes: tuple[str, ...],
        labels: dict[str, str],
        bucket_labels: tuple[dict[str, str], ...],
    ) -> None:
        self.bounds = bounds
        self.counts = [0.0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        #: its labels, and each bucket's with "le", made once (read only)
        self.labels = labels
        self.bucket_labels = bucket_labels
        #: one per bucket, then the sum's
        self._prefixes = prefixes
        self._text: str | None = None
        self._samples: list[Sample] | None = None

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self._text = self._samples = None

    def add(self, counts: Sequence[float], total: float) -> None:
        """Add per-bucket counts and a sum (a previous process's)."""
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum += total
        self._text = self._samples = None

    def samples(self, name: str) -> list[Sample]:
        """This series' scrape samples (cumulative buckets, count, sum), kept until it
        changes: at a scrape most series of an idle fleet have not. ``name`` is the
        family's; samples are immutable, so every scrape may share them."""
        if self._samples is None:
            running = list(accumulate(self.counts))
            samples = list(map(Sample, repeat(f"{name}_bucket"), self.bucket_labels, running))
            samples.append(Sample(f"{name}_count", self.labels, running[-1]))
            samples.append(Sample(f"{name}_sum", self.labels, self.sum))
            self._samples = samples
        return self._samples

    def text(self) -> str:
        """This series' samples (cumulative buckets, then the sum) as saved JSON text."""
        if self._text is None:
            # zip stops at the buckets: the last prefix is the sum's
            parts = [
                f"{prefix}{running!r}]"
                for prefix, running in zip(self._prefixes, accumulate(self.counts), strict=False)
            ]
            parts.append(f"{self._prefixes[-1]}{self.sum!r}]")
            self._text = ",".join(parts)
        return self._text


def add(
    counts: Iterable[tuple[CounterChild, float]],
    observations: Iterable[tuple[HistogramChild, float]],
) -> None:
    """Several increments and observations at once (a report's: one call from the hot
    path, not one per series)."""
    for counter, amount in counts:
        counter.inc(amount)
    for histogram, value in observations:
        histogram.observe(value)


class _Family:
    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labels)

    def key_of(self, values: dict[str, str]) -> tuple[str, ...]:
        if set(values) != set(self.labelnames):
            raise ValueError(
                f"{self.name} has labels {', '.join(self.labelnames)}, not {', '.join(values)}"
            )
        return tuple(str(values[n]) for n in self.labelnames)


class CounterFamily(_Family):
    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        super().__init__(name, doc, labels)
        self.children: dict[tuple[str, ...], CounterChild] = {}

    def labels(self, **values: str) -> CounterChild:
        key = self.key_of(values)
        child = self.children.get(key)
        if child is None:
            labels = dict(zip(self.labelnames, key, strict=True))
            child = self.children[key] = CounterChild(_prefix(f"{self.name}_total", labels), labels)
        return child

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        name = f"{self.name}_total"
        family.samples = [Sample(name, c.labels, c.value) for c in list(self.children.values())]
        return family

    def series(self) -> list[CounterChild]:
        return list(self.children.values())


class HistogramFamily(_Family):
    def __init__(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, doc, labels)
        self.bounds = tuple(float(b) for b in buckets)
        #: each bucket's "le" label, +Inf last
        self.les = (*(repr(b) for b in self.bounds), "+Inf")
        self.children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, **values: str) -> HistogramChild:
        key = self.key_of(values)
        child = self.children.get(key)
        if child is None:
            labels = dict(zip(self.labelnames, key, strict=True))
            bucket_labels = tuple({**labels, "le": le} for le in self.les)
            prefixes = (
                *(_prefix(f"{self.name}_bucket", b) for b in bucket_labels),
                _prefix(f"{self.name}_sum", labels),
            )
            child = self.children[key] = HistogramChild(
                self.bounds, prefixes, labels, bucket_labels
            )
        return child

    def collect(self) -> Metric:
        """The samples HistogramMetricFamily.add_metric would make (cumulative buckets,
        count, sum), built here with each series' label dicts made once: at 256 VMs
        this is most of the time a scrape spends in the event loop."""
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        samples = family.samples
        for child in list(self.children.values()):
            samples += child.samples(self.name)
        return family

    def series(self) -> list[HistogramChild]:
        return list(self.children.values())


class Totals(Collector):
    """The carried families, collected at scrape time, saved and restored as a whole."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.families: dict[str, CounterFamily | HistogramFamily] = {}

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> CounterFamily:
        family = CounterFamily(f"{self.prefix}_{name}", doc, labels)
        self.families[family.name] = family
        return family

    def histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        family = HistogramFamily(f"{self.prefix}_{name}", doc, labels, buckets)
        self.families[family.name] = family
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self.families.values():
            yield family.collect()

    def export_json(self) -> str:
        """Every series as ``[sample name, labels, value]`` (histogram buckets cumulative,
        as Prometheus exposes them, then the sum), as JSON text: each series' text is
        kept until it changes, so this is cheap when few series changed."""
        texts = [child.text() for family in self.families.values() for child in family.series()]
        return "[" + ",".join(texts) + "]"

    def restore(self, samples: object) -> int:
        """Add the totals a previous process exported to these (fresh) series. Every
        entry is checked first and nothing is applied if any is wrong (``ValueError``).
        Returns the number of series restored."""
        if not isinstance(samples, list):
            raise ValueError("saved totals are not a list")
        counters: list[tuple[CounterFamily, dict[str, str], float]] = []
        histograms: dict[tuple[str, tuple[str, ...]], _SavedHistogram] = {}
        for item in samples:
            name, labels, value = _checked(item)
            base, _, suffix = name.rpartition("_")
            family = self.families.get(base)
            if isinstance(family, CounterFamily) and suffix == "total":
                family.key_of(labels)  # the right label names, or ValueError
                counters.append((family, labels, value))
            elif isinstance(family, HistogramFamily) and suffix in ("bucket", "sum"):
                le = labels.pop("le", None) if suffix == "bucket" else None
                if suffix == "bucket" and le is None:
                    raise ValueError(f"saved bucket {item!r} has no le label")
                saved = histograms.setdefault(
                    (base, family.key_of(labels)), _SavedHistogram(family, labels)
                )
                saved.add(le, value)
            else:
                raise ValueError(f"saved total {name!r} is not a carried series")
        increments = [(saved, saved.increments()) for saved in histograms.values()]
        # Everything checked: apply.
        for counter, labels, value in counters:
            counter.labels(**labels).inc(value)
        for saved, (counts, total) in increments:
            saved.family.labels(**saved.labels).add(counts, total)
        return len(counters) + len(histograms)


class _SavedHistogram:
    """One histogram series as saved, until it is checked whole."""

    def __init__(self, family: HistogramFamily, labels: dict[str, str]) -> None:
        self.family = family
        self.labels = labels
        self.buckets: dict[float, float] = {}
        self.sum = 0.0

    def add(self, le: str | None, value: float) -> None:
        if le is None:
            self.sum = value
        else:
            self.buckets[float(le)] = value

    def increments(self) -> tuple[list[float], float]:
        """Per-bucket counts from the saved cumulative ones (checked to never go down)."""
        counts, before = [], 0.0
        for bound in (*self.family.bounds, math.inf):
            running = self.buckets.get(bound, before)
            if running < before:
                raise ValueError("saved histogram buckets are not cumulative")
            counts.append(running - before)
            before = running
        return counts, self.sum


def _checked(item: object) -> tuple[str, dict[str, str], float]:
    if not (isinstance(item, list) and len(item) == 3):
        raise ValueError(f"saved total {item!r} is not [name, labels, value]")
    name, labels, value = item
    if not (
        isinstance(name, str)
        and isinstance(labels, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        and type(value) in (int, float)
        and 0 <= value < math.inf
    ):
        raise ValueError(f"saved total {item!r} is malformed")
    return name, dict(labels), float(value)
