"""``vhost-user-balloon status``: a short per-VM table from a running daemon's /metrics."""

from __future__ import annotations

import argparse
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

from vhost_user_balloon.protocol import BalloonFeature, VirtioFeature

from ..config import DEFAULT_METRICS_LISTEN
from ..observing.metrics import PREFIX

__all__ = ["FEATURE_NAMES", "main", "render"]

MiB = 1 << 20


#: How each feature the guest may accept is shown: every balloon feature, and VERSION_1.
FEATURE_NAMES: Final = {
    BalloonFeature.MUST_TELL_HOST: "tell_host",
    BalloonFeature.STATS_VQ: "stats",
    BalloonFeature.DEFLATE_ON_OOM: "deflate_on_oom",
    BalloonFeature.FREE_PAGE_HINT: "hints",
    BalloonFeature.PAGE_POISON: "poison",
    BalloonFeature.REPORTING: "reporting",
    VirtioFeature.VERSION_1: "v1",
}


def _features(value: float) -> str:
    bits = int(value)
    return ",".join(name for bit, name in FEATURE_NAMES.items() if bits & bit) or "-"


def _shares(v: dict[str, float]) -> str:
    """The VM's weight under the automatic policy ('-': the policy is off)."""
    shares = v.get("auto_balloon_shares")
    return "-" if shares is None else f"{shares:.0f}"


def _churn(v: dict[str, float]) -> str:
    """What of the sampled reported memory the guest had taken again 60 s later."""
    checked = v.get("churn_checked_bytes_total", 0.0)
    if not checked:
        return "-"
    return f"{100 * v.get('churn_resident_bytes_total', 0.0) / checked:.0f}%"


def render(text: str) -> str:
    """The table for one scrape of /metrics."""
    vms: dict[str, dict[str, float]] = defaultdict(dict)
    orders: dict[str, dict[str, float]] = defaultdict(dict)
    why: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            vm = s.labels.get("vm")
            if vm is None or not s.name.startswith(PREFIX):
                continue
            name = s.name[len(PREFIX) + 1 :]
            if name == "reported_bytes_total":
                orders[vm][s.labels["order"]] = s.value
            elif name.startswith("churn_"):  # the status shows the 60 s window
                if s.labels.get("window") == "60s":
                    vms[vm][name] = vms[vm].get(name, 0.0) + s.value
            elif name == "auto_balloon_reason" and s.value:
                why[vm] = s.labels["reason"]
            elif name in ("protocol_errors_total", "discard_skipped_bytes_total"):
                vms[vm][name] = vms[vm].get(name, 0.0) + s.value
            else:
                vms[vm][name] = s.value
    lines = [
        f"{'VM':16} {'state':9} {'features':40} {'RAM':>9} {'resident':>9} "
        f"{'given back':>11} {'churn':>5} {'skipped':>8} {'errors':>6} {'balloon':>8} "
        f"{'shares':>6} {'why':18}"
        "  reported by order"
    ]
    for vm in sorted(vms):
        v = vms[vm]
        by_order = " ".join(
            f"{o}:{b / MiB:.0f}M"
            for o, b in sorted(orders[vm].items(), key=lambda kv: int(kv[0]))
            if b
        )
        lines.append(
            f"{vm:16} {'attached' if v.get('connected') else 'waiting':9} "
            f"{_features(v.get('negotiated_features', 0)):40} "
            f"{v.get('guest_ram_bytes', 0) / MiB:8.0f}M "
            f"{v.get('guest_ram_resident_bytes', 0) / MiB:8.0f}M "
            f"{v.get('discarded_bytes_total', 0) / MiB:10.0f}M {_churn(v):>5} "
            f"{v.get('discard_skipped_bytes_total', 0) / MiB:7.0f}M "
            f"{v.get('protocol_errors_total', 0):6.0f} "
            f"{v.get('target_bytes', 0) / MiB:7.0f}M {_shares(v):>6} {why.get(vm, '-'):18}  "
            f"{by_order or '-'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon status",
        description="Print a per-VM summary from a running daemon.",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=DEFAULT_METRICS_LISTEN,
        help=f"where the daemon serves /metrics (default {DEFAULT_METRICS_LISTEN})",
    )
    args = p.parse_args(argv)
    url = f"http://{args.metrics_listen}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError as err:
        print(f"vhost-user-balloon status: cannot read {url}: {err}", file=sys.stderr)
        return 1
    print(render(text))
    return 0
