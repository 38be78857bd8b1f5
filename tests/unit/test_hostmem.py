"""The host memory readers on files of every shape (the real /proc files are read in
tests/integration/test_hostmem.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_user_balloon.daemon.autoballoon.hostmem import (
    host_view,
    read_mem_available,
    read_psi_some_avg10,
)

MEMINFO = "MemTotal:       24684084 kB\nMemFree:        1000 kB\nMemAvailable:   24189864 kB\n"
PSI = (
    "some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\n"
    "full avg10=1.00 avg60=0.00 avg300=0.00 total=2345\n"
)


@pytest.mark.parametrize(
    ("text", "expect"),
    [(MEMINFO, 24189864 * 1024), ("MemTotal: 1 kB\n", None), ("MemAvailable: lots kB\n", None),
     ("MemAvailable: 5 MB\n", None), ("", None)],
)  # fmt: skip
def test_mem_available(tmp_path: Path, text: str, expect: int | None) -> None:
    (tmp_path / "meminfo").write_text(text)
    assert read_mem_available(tmp_path / "meminfo") == expect


@pytest.mark.parametrize(
    ("text", "expect"),
    [(PSI, 12.5), ("full avg10=1.00\n", None), ("some avg10=abc\n", None),
     ("some avg10=150.0\n", None), ("some avg60=1.0\n", None), ("", None)],
)  # fmt: skip
def test_psi_some_avg10(tmp_path: Path, text: str, expect: float | None) -> None:
    (tmp_path / "memory").write_text(text)
    assert read_psi_some_avg10(tmp_path / "memory") == expect


def test_missing_files_read_as_unknown(tmp_path: Path) -> None:
    view = host_view(tmp_path / "none", tmp_path / "none")
    assert (view.mem_available_bytes, view.psi_some_avg10) == (None, None)
