"""Run benchmarks, from the repository's root (after scripts/setup):

    .venv/bin/python -m benchmarks NAME [NAME ...] [--quick] [--json FILE]
                                   [--vms N] [--against CHECKOUT]

NAME is one of the table below, or ``all``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Final

from benchmarks.common import Options

#: Every benchmark: its module in this package and what it measures (printed in --help).
BENCHMARKS: Final = {
    "service": "a report's whole path against a raw punch loop, populated and not",
    "cost": "our wall and CPU time per report (in turns with --against CHECKOUT)",
    "parts": "each step of serving one report, timed in this process",
    "responsiveness": "GET_CONFIG round trips while this VM or another reports",
    "scale": "64 VMs reporting on one daemon: service time, CPU per GiB, RSS; idle cost",
    "guest": "a real guest under QEMU's built-in balloon and under the daemon",
    "handover": "what keeping connections across restarts costs, with and without a standby",
    "totals": "saving the metric totals at 256 VMs against rendering /metrics",
    "scrape": "how long the event loop stops while /metrics is scraped at 256 VMs",
    "policy": "the automatic balloon policy on 200 simulated VMs beside Proxmox and oVirt MOM",
    "soak": "a seeded chaos soak: faults on a schedule, invariants checked all along",
    "orders": "real guests at reporting orders 9, 7, 5, 10: given back, taken again, CPU",
}
#: The ones with options of their own (NAME --help), run by name only.
OWN_OPTIONS: Final = {
    "policy": "benchmarks.policy_sim", "soak": "benchmarks.soak", "orders": "benchmarks.orders",
}  # fmt: skip
#: ``all`` runs these, in this order (the real guest last: the slowest).
ALL: Final = [name for name in BENCHMARKS if name not in OWN_OPTIONS]


def main(argv: list[str]) -> int:
    table = "\n".join(f"  {name:15} {what}" for name, what in BENCHMARKS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=f"Benchmarks, each beside a baseline measured in the same run.\n\n{table}",
        epilog="all: every benchmark but policy, soak and orders, which have options of "
        "their own (python -m benchmarks soak --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="+", choices=[*BENCHMARKS, "all"], metavar="NAME")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--vms", type=int, default=64, help="VMs for scale (default 64)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument(
        "--against", type=Path, metavar="CHECKOUT",
        help="service, cost: also measure a daemon run from this checkout, in turns (its "
        "compiled extension copied in: vhost_user_balloon/daemon/linux/_syscalls.abi3.so)",
    )  # fmt: skip
    if argv[:1] and argv[0] in OWN_OPTIONS:
        return int(importlib.import_module(OWN_OPTIONS[argv[0]]).main(argv[1:]))
    args = p.parse_args(argv)
    options = Options(quick=args.quick, vms=args.vms, against=args.against)
    names = ALL if "all" in args.names else args.names
    out: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB",
        "python": sys.version.split()[0],
    }
    for name in names:
        print(f"== {name}: {BENCHMARKS[name]}")
        out[name] = importlib.import_module(f"benchmarks.{name}").run(options)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
