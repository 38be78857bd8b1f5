"""The Prometheus alerts and the Grafana dashboard users import: valid, tested, and only
about metrics the daemon really exports. promtool comes from Debian's prometheus package
(scripts/setup installs it)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from vhost_user_balloon.daemon.autoballoon.runner import AutoBalloonMetrics
from vhost_user_balloon.daemon.observing.metrics import Metrics, VmMemoryStats

OBS = Path(__file__).resolve().parents[2] / "observability"


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.watch_memory(lambda: {"vm": VmMemoryStats(1, 1)})
    AutoBalloonMetrics(metrics.registry)  # registered when the policy is on
    names = set()
    for family in metrics.registry.collect():
        for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created"):
            names.add(family.name + suffix)
    return names


def promtool(*args: str, cwd: Path = OBS) -> str:
    run = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_alert_rules_check_and_pass_their_unit_tests() -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_alert_rules_use_exported_metrics() -> None:
    names = exported_names()
    used = set(re.findall(r"vhost_user_balloon_[a-z_]+", (OBS / "alerts.yml").read_text()))
    assert used and used <= names, used - names


def test_dashboard_queries_parse_and_use_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((OBS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    names = exported_names()
    for expr in exprs:
        used = set(re.findall(r"vhost_user_balloon_[a-z_]+", expr))
        assert used and used <= names, (expr, used - names)
    # promtool has no PromQL checker of its own: recording rules it checks will do.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": e.replace("$instance", ".*").replace("$vm", ".*"),
                    }
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    out = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(exprs)} rules found" in out
