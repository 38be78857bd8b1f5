"""The chaos soak's short form (benchmarks/soak.py): 16 VMs played by the Python
frontend report for three minutes while the daemon is killed, upgraded, reloaded and
attacked on the schedule seed 7 draws, with every invariant checked as it goes.

The real guest (``--guest``: its balloon unplugged and plugged back among the faults)
is left out here: with it, QEMU 11.1.3 died of SIGSEGV in a fresh-clone CI run, 0.03 s
after the daemon told it of a new balloon size during a device_del (the open finding
in BENCHMARKS.md "The chaos soak"). The long form is run by hand, with it:
python -m benchmarks soak --guest --seconds 1800 --seed N."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.soak
def test_three_minutes_of_chaos_break_no_invariant(tmp_path: Path) -> None:
    figures = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "soak", "--seed", "7", "--seconds", "170",
         "--json", str(figures)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "seed 7" in done.stdout and "no invariant broken" in done.stdout
    out = json.loads(figures.read_text())
    # it was chaos: the daemon was killed and upgraded, and the VMs reported throughout
    assert out["faults"].get("kill", 0) >= 1 and out["faults"].get("upgrade", 0) >= 1, out
    assert out["reports"] > 1000, out
