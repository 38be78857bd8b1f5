"""The host's own memory state, for the automatic balloon policy: MemAvailable from
``/proc/meminfo`` and memory pressure from ``/proc/pressure/memory`` (or a cgroup v2
``memory.pressure``, same format). Each reader takes a path, so that tests can feed it
files; a missing or malformed file reads as None (the policy then does without it),
never as an exception."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from vhost_user_balloon.policy import HostView

__all__ = ["MEMINFO", "PSI_MEMORY", "host_view", "read_mem_available", "read_psi_some_avg10"]

MEMINFO: Final = Path("/proc/meminfo")
PSI_MEMORY: Final = Path("/proc/pressure/memory")


def read_mem_available(path: Path = MEMINFO) -> int | None:
    """MemAvailable in bytes (the file gives kB)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                return int(parts[0]) * 1024
            return None
    return None


def read_psi_some_avg10(path: Path = PSI_MEMORY) -> float | None:
    """The share of the last 10 s in which some task waited for memory, in percent."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind != "some":
            continue
        for item in fields:
            key, _, value = item.partition("=")
            if key == "avg10":
                try:
                    number = float(value)
                except ValueError:
                    return None
                return number if 0.0 <= number <= 100.0 else None
    return None


def host_view(meminfo: Path = MEMINFO, pressure: Path = PSI_MEMORY) -> HostView:
    return HostView(read_mem_available(meminfo), read_psi_some_avg10(pressure))
