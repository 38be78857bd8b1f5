"""``guest``: a real guest under QEMU's built-in balloon and under the daemon, same
workload, alternating: time until the memory is back, final level."""

from __future__ import annotations

import statistics

from benchmarks.common import Options, spread
from testbed.guestrun import GuestSpec, MiB, run_guest


def guest(repeats: int) -> dict[str, object]:
    rows: dict[str, list[tuple[float, int, int]]] = {"builtin": [], "daemon": []}
    for _ in range(repeats):
        for balloon in ("builtin", "daemon"):  # alternate, so drift hits both
            run = run_guest(GuestSpec(kernel="6.1", balloon=balloon, settle_s=20))
            secs = run.reclaim_seconds()
            assert secs is not None, f"{balloon}: memory never came back"
            rows[balloon].append((secs, run.final(), run.held_beyond_use()))
    for balloon, vals in rows.items():
        print(
            f"{balloon:8} free -> back within 64 MiB: "
            f"{spread([v[0] for v in vals], 's', 1)}; final level "
            f"{[round(v[1] / MiB, 1) for v in vals]} MiB, of which beyond the guest's own "
            f"use {[round(v[2] / MiB, 1) for v in vals]} MiB"
        )
    t_ratio = statistics.median([v[0] for v in rows["daemon"]]) / statistics.median(
        [v[0] for v in rows["builtin"]]
    )
    f_ours = statistics.median([v[1] for v in rows["daemon"]])
    f_ref = statistics.median([v[1] for v in rows["builtin"]])
    b_ours = statistics.median([v[2] for v in rows["daemon"]])
    b_ref = statistics.median([v[2] for v in rows["builtin"]])
    print(f"  time ratio daemon/built-in: {t_ratio:.3f} (target <= 1.05)")
    print(
        f"  final level: daemon {f_ours / MiB:.1f} MiB, built-in {f_ref / MiB:.1f} MiB; held "
        f"beyond the guest's use: daemon {b_ours / MiB:.1f}, built-in {b_ref / MiB:.1f} MiB "
        f"= {(b_ours - b_ref) / f_ref * 100:+.1f}% of the final level (target within 2%)"
    )
    return {
        "time_ratio": t_ratio,
        "final_mib": [f_ours / MiB, f_ref / MiB],
        "beyond_use_diff_pct": (b_ours - b_ref) / f_ref * 100,
    }


def run(options: Options) -> dict[str, object]:
    return guest(1 if options.quick else 3)
