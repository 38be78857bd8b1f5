"""A real Prometheus (Debian's package) scrapes the daemon with the shipped configuration
and rules: the series arrive with the documented labels, the dashboard's queries give
values, and the alerts react when provoked."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon_helpers import attach, free_port, settings_for
from tests.frontend import FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.config import AutoBalloon, VmSpec
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.server import Daemon
from vhost_user_balloon.daemon.serving import churn
from vhost_user_balloon.policy import PolicyConfig

OBS = Path(__file__).resolve().parents[2] / "observability"


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def until(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        """Poll ``check()`` (in a thread: it does blocking HTTP) until it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = check()
            except OSError:
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"Prometheus never showed {what}"
            time.sleep(0.5)


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    """The shipped prometheus.yml and alerts.yml, side by side as README says."""
    where = tmp_path / "prometheus"
    where.mkdir()
    shutil.copy(OBS / "alerts.yml", where / "alerts.yml")
    return where


@pytest.fixture
def run_prometheus(prometheus_dir: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> Prometheus:
        shipped = (OBS / "prometheus.yml").read_text()
        config = shipped.replace("127.0.0.1:9584", target).replace("15s", "1s")
        assert config.count("1s") == 2 and target in config
        (prometheus_dir / "prometheus.yml").write_text(config)
        port = free_port()
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={prometheus_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={prometheus_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        return Prometheus(port)

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


async def provoke(daemon: Daemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]) -> None:
    """A VM whose memory must not be discarded reports once (discard_skipped_bytes_total),
    and a peer sends a bad header (protocol_errors_total)."""
    kept = GuestMemfd(16 * MiB)
    guests.append(kept)
    fe_kept = await attach(str(daemon.vms[2].socket), kept, frontends)
    kept.populate(8 * MiB, 2 * MiB)
    await fe_kept.report(3, [(8 * MiB, 2 * MiB)])
    bad = trio.socket.socket(socket.AF_UNIX)
    await bad.connect(str(daemon.vms[3].socket))
    await bad.send(struct.pack("=III", 1, 7, 0))  # version 3
    assert await bad.recv(1) == b""  # closed on the error
    bad.close()


async def test_prometheus_scrapes_the_daemon_and_the_alerts_react(
    nursery: trio.Nursery,
    tmp_path: Path,
    run_prometheus: Any,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # churn checked within a second (labels kept), so that its panel has series
    monkeypatch.setattr(churn, "WINDOWS", (("10s", 0.5), ("60s", 1.0)))
    port = free_port()
    vms = [
        VmSpec("web1", tmp_path / "web1.sock"),
        VmSpec("idle1", tmp_path / "idle1.sock"),
        VmSpec("nodisc1", tmp_path / "nodisc1.sock", discard=False),
        VmSpec("bad1", tmp_path / "bad1.sock"),
    ]
    settings = settings_for(
        vms,
        metrics_listen=("127.0.0.1", port),
        # on, so that the dashboard's automatic-ballooning row has series to show
        auto_balloon=AutoBalloon(PolicyConfig(budget_bytes=1 << 30, interval_s=1)),
    )
    daemon = Daemon(settings, metrics=Metrics())
    daemon_scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        with daemon_scope:
            await daemon.run(task_status=task_status)

    await nursery.start(serve)
    guest = GuestMemfd(32 * MiB)
    guests.append(guest)
    fe = await attach(str(daemon.vms[0].socket), guest, frontends)
    idle = GuestMemfd(16 * MiB)
    guests.append(idle)
    await attach(str(daemon.vms[1].socket), idle, frontends)
    await provoke(daemon, guests, frontends)
    prom: Prometheus = run_prometheus(f"127.0.0.1:{port}")

    # web1 reports until the alerts are checked: however late Prometheus's first scrape
    # comes, it sees web1's reports increase (a loaded machine once started it after
    # a fixed 8 s of reports had ended, and web1 looked stalled).
    reporting = trio.CancelScope()

    async def keep_reporting() -> None:
        with reporting:
            while True:
                guest.populate(8 * MiB, 4 * MiB)
                await fe.report(3, [(8 * MiB, 4 * MiB)])
                await trio.sleep(0.5)

    nursery.start_soon(keep_reporting)
    await trio.sleep(8)
    # The series, with the labels README documents and the job the rules expect.
    series = await trio.to_thread.run_sync(
        prom.until, "reported bytes",
        lambda: prom.query('vhost_user_balloon_reported_bytes_total{vm="web1"}'),
    )  # fmt: skip
    labels = series[0]["metric"]
    assert labels["job"] == "vhost-user-balloon" and labels["order"] == "10", labels
    assert float(series[0]["value"][1]) >= 4 * MiB
    # Every dashboard query gives a value on the real server.
    dashboard = json.loads((OBS / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$instance", ".*").replace("$vm", ".*")
            result = await trio.to_thread.run_sync(prom.until, expr, lambda e=expr: prom.query(e))
            assert result, expr
    # An attached VM that sends no report: "reporting stalled" is on its way (pending:
    # its `for: 1h` is checked by promtool's unit tests, alerts_test.yml).
    stalled = await trio.to_thread.run_sync(
        prom.until, "ReportingStalled for idle1",
        lambda: [a for a in prom.api("alerts")["alerts"]
                 if a["labels"]["alertname"] == "VhostUserBalloonReportingStalled"],
    )  # fmt: skip
    # (nodisc1 reported before the first scrape: no increase in the window either.)
    assert "idle1" in {a["labels"]["vm"] for a in stalled}
    assert "web1" not in {a["labels"]["vm"] for a in stalled}
    assert {a["state"] for a in stalled} == {"pending"}
    # The protocol error fires at once (no `for:`), naming the VM and the reason: the
    # first error of a series, which plain increase() would never have seen.
    fired = await trio.to_thread.run_sync(
        prom.until, "ProtocolErrors for bad1",
        lambda: [a for a in prom.api("alerts")["alerts"]
                 if a["labels"]["alertname"] == "VhostUserBalloonProtocolErrors"
                 and a["state"] == "firing"],
    )  # fmt: skip
    assert [(a["labels"]["vm"], a["labels"]["reason"]) for a in fired] == [("bad1", "bad_version")]
    # The daemon stops answering: "daemon down" (pending for its `for: 5m`).
    reporting.cancel()
    daemon_scope.cancel()
    down = await trio.to_thread.run_sync(
        prom.until, "VhostUserBalloonDown",
        lambda: [a for a in prom.api("alerts")["alerts"]
                 if a["labels"]["alertname"] == "VhostUserBalloonDown"],
    )  # fmt: skip
    assert down[0]["labels"]["job"] == "vhost-user-balloon"
    assert down[0]["state"] == "pending"
    rules = await trio.to_thread.run_sync(prom.api, "rules")
    names = {r["name"] for g in rules["groups"] for r in g["rules"]}
    assert names == {
        "VhostUserBalloonDown", "VhostUserBalloonProtocolErrors",
        "VhostUserBalloonReportingStalled", "VhostUserBalloonDiscardFailing",
        "VhostUserBalloonBudgetExceeded", "VhostUserBalloonReportingChurn",
    }  # fmt: skip
    assert all(r["health"] == "ok" for g in rules["groups"] for r in g["rules"])
