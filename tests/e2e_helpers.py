"""What the e2e tests that drive several QEMUs share: starting a guest and following its
console, waiting for a condition, and the daemon's metrics read the way the tests read
them."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from testbed.guestrun import Env, GuestSpec, MiB, parse_metrics, pump, qemu_args, stop_process
from tests.daemon_helpers import Logs

__all__ = ["Console", "assert_gets_memory_back", "metric", "reported", "start_guest", "wait"]


def wait(what: str, check: Any, timeout: float = 90) -> Any:
    """Poll ``check`` every half second until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return value


class Console:
    """A guest's serial console, with the time each VUB: marker first appeared."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.markers: dict[str, float] = {}
        self.stderr: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=12)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        pump(proc.stdout, self._line)
        pump(proc.stderr, self.stderr.append)

    def _line(self, line: str) -> None:
        self.tail.append(line)
        self.lines.append(line)
        at = line.find("VUB: ")
        if at >= 0:
            with self._cond:
                self.markers.setdefault(line[at + 5 :].strip().split(" mib=")[0], time.monotonic())
                self._cond.notify_all()

    def wait(self, marker: str, timeout: float) -> float:
        """When the first marker starting with ``marker`` appeared."""

        def seen() -> list[float]:
            return [t for text, t in self.markers.items() if text.startswith(marker)]

        with self._cond:
            ok = self._cond.wait_for(lambda: bool(seen()), timeout)
            assert ok, (
                f"no {marker!r} from the guest: {sorted(self.markers)} {self.stderr}; "
                f"its console ended with {list(self.tail)}"
            )
            return min(seen())


def metric(url: str, key: str) -> float:
    """One series (``name{labels}`` as /metrics writes it): 0 while that series does
    not exist yet, an error if the daemon exports no such metric."""
    with urllib.request.urlopen(url, timeout=5) as r:
        return parse_metrics(r.read().decode()).series(key)


def reported(url: str, vm: str) -> float:
    return sum(
        metric(url, f'vhost_user_balloon_reported_bytes_total{{order="{o}",vm="{vm}"}}')
        for o in (9, 10)
    )


def assert_gets_memory_back(
    url: str, vm: str, guest: Console, *, after: float, round_: int = 1, timeout: float = 60
) -> None:
    """The guest's 512 MiB round ``round_`` starts after ``after``; what it frees is reported and
    leaves the host (the guest RAM file's allocated blocks, as the daemon exports them)."""
    resident = f'vhost_user_balloon_guest_ram_resident_bytes{{vm="{vm}"}}'
    assert guest.wait(f"alloc round={round_}", timeout) > after, "the round ran too early"
    before = reported(url, vm)
    peak_at = guest.wait(f"allocated round={round_}", 60)
    peak = now = metric(url, resident)
    freed_at = guest.wait(f"freed round={round_}", 60)
    while time.monotonic() < freed_at + 60 and peak - now < 400 * MiB:
        time.sleep(0.5)
        now = metric(url, resident)
    print(
        f"\n{vm} VM: resident {peak / MiB:.0f} MiB after its allocation "
        f"({peak_at - after:.1f} s after the commands), {now / MiB:.0f} MiB "
        f"{time.monotonic() - freed_at:.1f} s after the free"
    )
    assert peak - now >= 400 * MiB, (peak / MiB, now / MiB)
    # A report's blocks leave the host one punch at a time and the report is counted
    # once all are done: the scrape above may have come in the middle of one (up to
    # 128 MiB). Its count follows within milliseconds.
    deadline = time.monotonic() + 10
    while reported(url, vm) - before < 400 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reported(url, vm) - before >= 400 * MiB, (reported(url, vm) - before) / MiB


def start_guest(
    env: Env, spec: GuestSpec, args: list[str], started: list[subprocess.Popen[bytes]]
) -> Console:
    """A QEMU running ``spec``'s guest with ``args`` (the attach options and any more),
    its console followed. It joins ``started``, which the test stops at its end."""
    qemu = subprocess.Popen(
        env.command(qemu_args(spec, env, args)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(qemu)
    return Console(qemu)


def daemon_with_config(conf: Path) -> tuple[subprocess.Popen[str], Logs]:
    """The daemon started from ``conf`` (SIGHUP reloads it), JSON logs, an ephemeral
    metrics port; its log lines as they come."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", f"--config={conf}", "--log-format=json",
         "--metrics-listen=127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return daemon, Logs(daemon)


def sparse_disk(path: Path, size: int) -> Path:
    """A disk image of ``size`` bytes that holds nothing: reading it fills the guest's
    page cache, not the host's."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def stop_all(qemus: list[subprocess.Popen[bytes]], daemon: subprocess.Popen[str]) -> None:
    """The test's QEMUs, then its daemon, as a host shuts down."""
    for q in qemus:
        stop_process(q, signal.SIGTERM, 5)
    stop_process(daemon, signal.SIGTERM, 15)
