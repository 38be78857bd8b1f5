"""The QEMU 11.1.3 captures as golden vectors: load them and replay them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CAPTURES = Path(__file__).parent / "captures"


@dataclass(frozen=True)
class Record:
    """One frontend->backend message of a capture."""

    name: str
    raw: bytes
    nfds: int


def load_capture(name: str) -> list[Record]:
    """The frontend->backend messages of one capture, in order."""
    records = []
    with (CAPTURES / name).open() as f:
        next(f)  # the scenario line
        for line in f:
            d = json.loads(line)
            if d["dir"] == "frontend->backend":
                records.append(Record(d["name"], bytes.fromhex(d["hex"]), d["nfds"]))
    return records


CAPTURE_NAMES = sorted(p.name for p in CAPTURES.glob("*.jsonl"))
