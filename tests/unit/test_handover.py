"""The hand-over pieces on their own: saved-state slots, fd names, the keeper's books."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from tests.service_manager import ServiceManager
from vhost_user_balloon.daemon.handover.store import (
    STATE_SLOT_BYTES,
    FdStore,
    StateFile,
    VmKeeper,
    fd_name,
    kept_vms,
    parse_fd_name,
)
from vhost_user_balloon.daemon.linux.syscalls import same_open_file
from vhost_user_balloon.daemon.linux.systemd import Notifier
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.observing.totals import HistogramChild, HistogramFamily


def test_state_survives_a_write_torn_in_the_middle() -> None:
    state = StateFile.create("web1")
    try:
        state.write({"n": 1})
        state.write({"n": 2})
        assert StateFile(state.fd).read() == {"n": 2}
        # The process dies halfway through writing record 3: its slot is garbage,
        # and the reader falls back to the other slot, record 2.
        slot = (state.seq + 1) % 2
        os.pwrite(state.fd, b"VUBS" + b"\xff" * 40, slot * STATE_SLOT_BYTES)
        assert StateFile(state.fd).read() == {"n": 2}
        # The next process goes on numbering after what it read.
        reader = StateFile(state.fd)
        assert reader.read() == {"n": 2}
        reader.write({"n": 3})
        assert StateFile(state.fd).read() == {"n": 3}
    finally:
        os.close(state.fd)


def test_an_empty_or_foreign_state_file_reads_as_none() -> None:
    fd = os.memfd_create("x")
    try:
        assert StateFile(fd).read() is None
        os.write(fd, b"not a state file at all" * 100)
        assert StateFile(fd).read() is None
    finally:
        os.close(fd)


def test_a_state_too_big_for_a_slot_is_refused() -> None:
    state = StateFile.create("web1")
    try:
        with pytest.raises(ValueError, match="does not fit"):
            state.write({"x": "y" * STATE_SLOT_BYTES})
    finally:
        os.close(state.fd)


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("vub.web1.conn", ("web1", "conn")),
        ("vub.db.eu-west.1.17", ("db.eu-west.1", "17")),  # VM names may have dots
        ("vub.web1.listen", ("web1", "listen")),
        ("web1", None),  # socket activation: the .socket unit's FileDescriptorName=
        ("vub.web1.other", None),
        ("vub..conn", None),
        ("vub.conn", None),
    ],
)
def test_fd_names(name: str, parsed: tuple[str, str] | None) -> None:
    assert parse_fd_name(name) == parsed
    if parsed is not None:
        assert fd_name(*parsed) == name


def test_stored_fds_are_sorted_by_vm_and_the_rest_left_for_socket_activation() -> None:
    inherited = {"vub.a.conn": 3, "vub.a.7": 4, "web2": 5, "vub.b.state": 6}
    stored = kept_vms(inherited)
    assert inherited == {"web2": 5}
    assert {vm: s.fds for vm, s in stored.items()} == {
        "a": {"vub.a.conn": 3, "vub.a.7": 4},
        "b": {"vub.b.state": 6},
    }
    assert stored["a"].get("conn") == 3 and stored["a"].get("state") is None


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[ServiceManager]:
    """The keeper's end of sd_notify, for the books: what was stored and removed."""
    manager = ServiceManager(tmp_path / "notify")
    yield manager
    manager.close()


def test_one_open_file_sent_twice_is_stored_once(recorder: ServiceManager) -> None:
    """QEMU sends one memfd for both RAM regions of a big guest; systemd would keep
    only one copy, so the keeper's books must name it once."""
    keeper = VmKeeper.start(FdStore(recorder.notifier, enabled=True), "web1")
    memfd = os.memfd_create("ram")
    again = os.dup(memfd)  # what SCM_RIGHTS makes of the same fd sent twice
    other = os.eventfd(0)
    try:
        first = keeper.keep(memfd)
        assert keeper.keep(again) == first
        assert keeper.keep(other) != first
        keeper.save({"regions": [first]}, [first])  # `other` is no longer named
        recorder.sync()
        assert set(recorder.kept) == {"vub.web1.state", first}
        assert same_open_file(recorder.kept[first][0], memfd)
        # A new process takes the books over and numbers new fds after the ones kept.
        successor = VmKeeper(keeper.store, "web1", StateFile(keeper.state.fd))
        for name, fds in recorder.kept.items():
            successor.add_kept(name, os.dup(fds[0]))
        assert successor.keep(memfd) == first
        newer = successor.keep(other)
        recorder.sync()
        assert newer != first and sorted(recorder.kept) == sorted([first, newer, "vub.web1.state"])
        successor.release_all()
        recorder.sync()
        assert recorder.kept == {}
        keeper.close()
    finally:
        for fd in (memfd, again, other):
            os.close(fd)


def test_without_a_keeper_nothing_is_stored(tmp_path: Path) -> None:
    assert not FdStore(Notifier({}), enabled=True).enabled
    assert not FdStore(Notifier({"NOTIFY_SOCKET": str(tmp_path / "x")}), enabled=False).enabled


def _busy_metrics() -> Metrics:
    m = Metrics()
    vm = m.for_vm("web1")
    vm.record_report({9: (3, 6 << 20), 10: (1, 4 << 20)}, 10 << 20, {"unaligned": 4096}, 0.003)
    vm.record_report({10: (32, 128 << 20)}, 128 << 20, {}, 0.02)
    m.protocol_errors.labels(vm="web2", reason="bad_flags").inc()
    m.balloon_inflated_bytes.labels(vm="web1").inc(1 << 30)
    return m


def exported(m: Metrics) -> list[list[Any]]:
    """The saved totals' format, written out from the series as they are (the oracle
    for the text the metrics keep per series): ``[sample name, labels, value]``,
    histogram buckets cumulative as Prometheus shows them, then their sum."""
    out: list[list[Any]] = []
    for family in m.totals.families.values():
        for child in family.series():
            if isinstance(child, HistogramChild):
                buckets = zip(child.bucket_labels, accumulate(child.counts), strict=True)
                out += [[f"{family.name}_bucket", labels, n] for labels, n in buckets]
                out.append([f"{family.name}_sum", child.labels, child.sum])
            else:
                out.append([f"{family.name}_total", child.labels, child.value])
    return out


def test_the_saved_json_text_is_the_export_and_follows_every_change() -> None:
    """What is saved before each scrape is text kept per series until it changes; it
    must always read back as exactly the series' totals (``exported``)."""
    m = _busy_metrics()
    assert json.loads(m.export_totals_json()) == exported(m)
    vm = m.for_vm("web1")
    vm.record_report({9: (1, 2 << 20)}, 2 << 20, {"poison": 4096}, 0.5)  # a new bucket too
    m.protocol_errors.labels(vm="web2", reason="bad_flags").inc()
    assert json.loads(m.export_totals_json()) == exported(m)
    restored = Metrics()
    restored.restore_totals(exported(m))
    assert json.loads(restored.export_totals_json()) == exported(m)
    restored.for_vm("web1").record_report({10: (1, 4 << 20)}, 4 << 20, {}, 0.001)
    assert json.loads(restored.export_totals_json()) == exported(restored)
    assert json.loads(Metrics().export_totals_json()) == []


def _scrapes_as_prometheus_client_would(m: Metrics) -> None:
    for family in m.totals.families.values():
        ours = family.collect()
        if isinstance(family, HistogramFamily):
            ref = HistogramMetricFamily(family.name, family.doc, labels=family.labelnames)
            for key, child in family.children.items():
                buckets = list(zip(family.les, accumulate(child.counts), strict=True))
                ref.add_metric(list(key), buckets, child.sum)
        else:
            ref = CounterMetricFamily(family.name, family.doc, labels=family.labelnames)
            for key, child in family.children.items():
                ref.add_metric(list(key), child.value)
        assert ours == ref, family.name


def test_carried_series_scrape_as_prometheus_client_would_make_them() -> None:
    """The carried families build their samples themselves (label dicts made once,
    a histogram's samples kept until it changes); they must be exactly what
    prometheus_client's add_metric makes, at every scrape."""
    m = _busy_metrics()
    _scrapes_as_prometheus_client_would(m)
    assert any(f.children for f in m.totals.families.values() if isinstance(f, HistogramFamily))
    m.for_vm("web1").record_report({9: (1, 2 << 20)}, 2 << 20, {"poison": 4096}, 0.5)
    _scrapes_as_prometheus_client_would(m)  # what changed shows, the rest as it was
    restored = Metrics()
    restored.restore_totals(exported(m))
    _scrapes_as_prometheus_client_would(restored)
    restored.for_vm("web1").record_report({9: (1, 2 << 20)}, 2 << 20, {}, 0.001)
    _scrapes_as_prometheus_client_would(restored)


def test_metric_totals_go_on_in_the_next_process() -> None:
    before = _busy_metrics()
    saved = json.loads(json.dumps(exported(before)))  # crosses a process boundary
    after = Metrics()
    assert after.restore_totals(saved) == len(
        {
            (n.rsplit("_", 1)[0], str({k: v for k, v in labels.items() if k != "le"}))
            for n, labels, _ in saved
        }
    )
    assert exported(after) == exported(before)
    after.for_vm("web1").record_report({10: (1, 4 << 20)}, 4 << 20, {}, 0.001)
    value = after.registry.get_sample_value(
        "vhost_user_balloon_reported_bytes_total", {"vm": "web1", "order": "10"}
    )
    assert value == (128 + 4 + 4) << 20


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.append(["vhost_user_balloon_nonsense_total", {"vm": "x"}, 1]),
        lambda s: s.append(["vhost_user_balloon_reports_total", {"vm": "x"}, -1]),
        lambda s: s.append(["vhost_user_balloon_reports_total", {"vm": "x"}, float("inf")]),
        lambda s: s.append(["vhost_user_balloon_reports_total", {"nope": "x"}, 1]),
        lambda s: s.append(["vhost_user_balloon_reports_total", {"vm": 7}, 1]),
        lambda s: s.append(["vhost_user_balloon_report_entries_bucket", {"vm": "x"}, 1]),
        lambda s: s.append("not a triple"),
    ],
)
def test_damaged_totals_are_refused_whole(damage: Any) -> None:
    """One bad entry and nothing is applied: counters then start from 0, which
    Prometheus reads as a reset, never as a counter going down."""
    saved = exported(_busy_metrics())
    damage(saved)
    fresh = Metrics()
    with pytest.raises(ValueError):
        fresh.restore_totals(saved)
    assert all(value == 0 for _, _, value in exported(fresh))


def test_carried_series_are_exposed_as_prometheus_reads_them() -> None:
    """Our own counters and histograms (no prometheus_client internals) on the page:
    cumulative buckets, +Inf equal to the count, the sum, counters with _total."""
    m = _busy_metrics()
    get = m.registry.get_sample_value
    labels = {"vm": "web1"}
    assert get("vhost_user_balloon_report_service_seconds_bucket", {**labels, "le": "0.0025"}) == 0
    assert get("vhost_user_balloon_report_service_seconds_bucket", {**labels, "le": "0.005"}) == 1
    assert get("vhost_user_balloon_report_service_seconds_bucket", {**labels, "le": "+Inf"}) == 2
    assert get("vhost_user_balloon_report_service_seconds_count", labels) == 2
    assert get("vhost_user_balloon_report_service_seconds_sum", labels) == pytest.approx(0.023)
    assert get("vhost_user_balloon_report_entries_bucket", {**labels, "le": "32.0"}) == 2
    assert get("vhost_user_balloon_reports_total", labels) == 2
    page = generate_latest(m.registry).decode()
    assert "# TYPE vhost_user_balloon_reports_total counter" in page
    assert "# TYPE vhost_user_balloon_report_entries histogram" in page
    with pytest.raises(ValueError, match="labels vm"):
        m.reports.labels(vm="web1", order="9")
    with pytest.raises(ValueError, match="only goes up"):
        m.reports.labels(vm="web1").inc(-1)
