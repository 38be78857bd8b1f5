"""The demo: a real guest allocates and frees memory; watch the host get it back.

    .venv/bin/python -m testbed.demo [--kernel 6.1] [--mib 1024] [--rounds 2] [--settle 25]

(from the repository's root, after scripts/setup; scripts/demo does both.)
"""

from __future__ import annotations

import argparse
import sys

from testbed.guestrun import Env, GuestRun, GuestSpec, MiB, Sample, SetupError, run_guest

HEADER = "   time  guest phase           host RAM held   reported (by order)       given back"


def _mib(n: float) -> str:
    return f"{n / MiB:7.0f} MiB"


def parse(argv: list[str]) -> GuestSpec:
    p = argparse.ArgumentParser(
        prog="python -m testbed.demo",
        description="A real guest frees memory; watch the host get it back through "
        "vhost-user-balloon.",
    )
    p.add_argument("--kernel", default="6.1", help="guest kernel: 6.1 or 6.12 (default 6.1)")
    p.add_argument("--mib", type=int, default=1024, help="MiB the guest allocates and frees")
    p.add_argument("--rounds", type=int, default=2, help="allocate/free rounds (default 2)")
    p.add_argument("--settle", type=int, default=25, help="seconds after each free")
    args = p.parse_args(argv)
    return GuestSpec(
        kernel=args.kernel, workload_mib=args.mib, rounds=args.rounds, settle_s=args.settle
    )


class Progress:
    """One line a second while the guest runs: its phase, the host memory its RAM holds,
    and what /metrics says was reported and given back."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, run: GuestRun, s: Sample) -> None:
        if s.t - self.last < 1.0:
            return
        self.last = s.t
        phases = {
            k: t
            for k, t in run.markers.items()
            if not k.startswith(("meminfo", "balloon")) and " mib=" not in k
        }
        phase = max(phases.items(), key=lambda kv: kv[1])[0] if phases else "booting"
        orders = run.metric_labels("vhost_user_balloon_reported_bytes_total", "order")
        by_order = " ".join(
            f"o{o}:{v / MiB:.0f}M" for o, v in sorted(orders.items(), key=lambda kv: int(kv[0]))
        )
        given = run.metric("vhost_user_balloon_discarded_bytes_total")
        print(
            f"{s.t:6.1f}s  {phase[:20]:20}  {_mib(s.memfd_bytes)}    {by_order[:24]:24}  "
            f"{_mib(given)}",
            flush=True,
        )


def summary(run: GuestRun, spec: GuestSpec) -> int:
    """What the run showed, after it; 1 if the guest did not finish its workload."""
    if "done" not in run.markers:
        print("the guest did not finish; last console lines:")
        for _, line in run.console[-15:]:
            print("   ", line)
        return 1
    print(
        f"host RAM held by the guest: before the workload {_mib(run.floor())}, "
        f"peak {_mib(run.peak())}, at the end {_mib(run.final())}"
    )
    for r in range(1, spec.rounds + 1):
        secs = run.reclaim_seconds(r)
        print(
            f"round {r}: memory back on the host (within 64 MiB) "
            + (f"{secs:.1f} s after the guest freed it" if secs is not None else "never")
        )
    print("\nper-order counters from /metrics:")
    blocks = run.metric_labels("vhost_user_balloon_reported_blocks_total", "order")
    for o, v in sorted(blocks.items(), key=lambda kv: int(kv[0])):
        print(f"  order {o:>2} ({4 << int(o)} KiB blocks): {v:8.0f} blocks reported")
    return 0


def main(argv: list[str]) -> int:
    spec = parse(argv)
    env = Env.load()
    print(
        f"{env.qemu_version}; guest kernel {spec.kernel}, {spec.mem_mib} MiB RAM, TCG; "
        f"workload: {spec.rounds} x allocate and free {spec.workload_mib} MiB\n"
    )
    print(HEADER)
    run = run_guest(spec, env, on_sample=Progress())
    print()
    return summary(run, spec)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SetupError as err:
        print(f"testbed.demo: {err}", file=sys.stderr)
        sys.exit(1)
