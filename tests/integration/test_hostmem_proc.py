"""The host memory readers on this machine's real /proc files."""

from __future__ import annotations

from pathlib import Path

from vhost_user_balloon.daemon.autoballoon.hostmem import host_view


def test_this_hosts_proc_files() -> None:
    view = host_view()
    total_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert view.mem_available_bytes is not None
    assert 0 < view.mem_available_bytes <= total_kb * 1024
    # every kernel these tests run on has PSI (Linux >= 4.20 with CONFIG_PSI)
    assert view.psi_some_avg10 is not None and 0.0 <= view.psi_some_avg10 <= 100.0
