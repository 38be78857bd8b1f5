"""``vhost-user-balloon status``: the table it prints from a daemon's /metrics."""

from __future__ import annotations

from vhost_user_balloon.daemon.commands.status import FEATURE_NAMES, render
from vhost_user_balloon.protocol import BalloonFeature, VirtioFeature


def test_every_feature_a_guest_may_accept_has_a_name() -> None:
    assert set(FEATURE_NAMES) == {*BalloonFeature, VirtioFeature.VERSION_1}


def test_the_features_column_names_what_the_guest_accepted() -> None:
    bits = (
        BalloonFeature.STATS_VQ
        | BalloonFeature.DEFLATE_ON_OOM
        | BalloonFeature.REPORTING
        | VirtioFeature.VERSION_1
    )
    page = (
        "# TYPE vhost_user_balloon_connected gauge\n"
        'vhost_user_balloon_connected{vm="web1"} 1\n'
        "# TYPE vhost_user_balloon_negotiated_features gauge\n"
        f'vhost_user_balloon_negotiated_features{{vm="web1"}} {int(bits)}\n'
    )
    (row,) = render(page).splitlines()[1:]
    assert row.split()[:3] == ["web1", "attached", "stats,deflate_on_oom,reporting,v1"]


def test_the_shares_column_shows_the_policy_s_weight_or_a_dash() -> None:
    page = (
        "# TYPE vhost_user_balloon_connected gauge\n"
        'vhost_user_balloon_connected{vm="web1"} 1\n'
        'vhost_user_balloon_connected{vm="db1"} 1\n'
        "# TYPE vhost_user_balloon_auto_balloon_shares gauge\n"
        'vhost_user_balloon_auto_balloon_shares{vm="web1"} 2000\n'
    )
    header, *rows = render(page).splitlines()
    end = header.index("shares") + len("shares")  # right-aligned under its title
    cells = {row.split()[0]: row[:end].split()[-1] for row in rows}
    assert cells == {"web1": "2000", "db1": "-"}


def test_the_churn_column_is_the_share_taken_again_within_60_s() -> None:
    page = (
        "# TYPE vhost_user_balloon_connected gauge\n"
        'vhost_user_balloon_connected{vm="web1"} 1\n'
        'vhost_user_balloon_connected{vm="db1"} 1\n'
        "# TYPE vhost_user_balloon_churn_checked_bytes_total counter\n"
        'vhost_user_balloon_churn_checked_bytes_total{order="9",vm="web1",window="10s"} 100\n'
        'vhost_user_balloon_churn_checked_bytes_total{order="9",vm="web1",window="60s"} 300\n'
        'vhost_user_balloon_churn_checked_bytes_total{order="10",vm="web1",window="60s"} 100\n'
        "# TYPE vhost_user_balloon_churn_resident_bytes_total counter\n"
        'vhost_user_balloon_churn_resident_bytes_total{order="9",vm="web1",window="10s"} 90\n'
        'vhost_user_balloon_churn_resident_bytes_total{order="9",vm="web1",window="60s"} 50\n'
        'vhost_user_balloon_churn_resident_bytes_total{order="10",vm="web1",window="60s"} 50\n'
    )
    header, *rows = render(page).splitlines()
    end = header.index("churn") + len("churn")
    cells = {row.split()[0]: row[:end].split()[-1] for row in rows}
    assert cells == {"web1": "25%", "db1": "-"}  # (50 + 50) / (300 + 100)
