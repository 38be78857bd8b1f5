"""Helpers for tests that run the daemon in this process."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from tests.frontend import FakeFrontend, GuestMemfd
from vhost_user_balloon.daemon.cli import build_parser
from vhost_user_balloon.daemon.config import Settings, VmSpec, load_settings
from vhost_user_balloon.daemon.observing.metrics import PREFIX
from vhost_user_balloon.daemon.server import Daemon

StartDaemon = Callable[..., Coroutine[Any, Any, Daemon]]


def settings_for(vms: list[VmSpec], **changes: Any) -> Settings:
    """The daemon's defaults for ``vms`` (read as the command line gives them, each
    VM as given), no metrics port (tests scrape the registry), and ``changes`` (any
    field of Settings)."""
    argv = [a for vm in vms for a in ("--vm", f"{vm.name}={vm.socket}")]
    defaults = load_settings(build_parser().parse_args(argv))
    return replace(defaults, **{"vms": tuple(vms), "metrics_listen": None, **changes})


class Logs:
    """A command's JSON log lines (the daemon's, a supervisor's and its daemons'),
    read in a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # JSON lines: stdout is not a terminal
            with self._cond:
                self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(
        self, event: str, count: int = 1, timeout: float = 15.0, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th line with this event (and these field values)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.events(event, **fields)) >= count, timeout)
            assert ok, f"no {count} x {event} {fields} in {[r['event'] for r in self.lines]}"
            return self.events(event, **fields)[count - 1]

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.lines if r["event"] == event and r.items() >= fields.items()]


#: ``run_command(*argv)``: ``vhost-user-balloon *argv`` as its own process
RunCommand = Callable[..., Logs]


def children(pid: int) -> list[int]:
    """A process's children (none once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    """A daemon's /metrics page, as Prometheus reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    """The value of one series the daemon exports (``name`` without the prefix). A
    series it never exported is an error, not 0: a misspelled name or label must fail."""
    value = daemon.metrics.registry.get_sample_value(f"{PREFIX}_{name}", labels)
    if value is None:
        known = samples(daemon, name)
        raise AssertionError(f"no series {PREFIX}_{name}{labels}; it has {sorted(known)}")
    return value


def sample_or_none(daemon: Daemon, name: str, **labels: str) -> float | None:
    """``sample``, or None while the series is not exported yet: for waiting until it
    is (a misspelled name then never appears and the wait fails)."""
    return daemon.metrics.registry.get_sample_value(f"{PREFIX}_{name}", labels)


def samples(daemon: Daemon, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series of the sample ``name`` whose labels include ``labels``, by their
    labels (empty if none has been counted yet). A name the daemon does not export at
    all is an error."""
    full = f"{PREFIX}_{name}"
    found: dict[tuple[tuple[str, str], ...], float] = {}
    family_known = False
    for family in daemon.metrics.registry.collect():
        suffix = full.removeprefix(family.name)
        if suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"):
            family_known = True
        for s in family.samples:
            if s.name == full and s.labels.items() >= labels.items():
                found[tuple(sorted(s.labels.items()))] = s.value
    if not family_known:
        raise AssertionError(f"the daemon exports no metric {full}")
    return found


async def wait_disconnected(daemon: Daemon, vm: str, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while vm in daemon.connections:
            await trio.sleep(0.005)


async def connect(
    daemon_sock: str, guest: GuestMemfd, frontends: list[FakeFrontend]
) -> FakeFrontend:
    """A frontend connected to ``daemon_sock`` (nothing sent yet), closed at the end."""
    fe = await FakeFrontend.connect(daemon_sock, guest)
    frontends.append(fe)
    return fe


async def attach(
    daemon_sock: str, guest: GuestMemfd, frontends: list[FakeFrontend], **start: object
) -> FakeFrontend:
    fe = await connect(daemon_sock, guest, frontends)
    await fe.handshake()
    await fe.start(**start)  # type: ignore[arg-type]
    return fe


async def one_guest(
    start_daemon: StartDaemon,
    guests: list[GuestMemfd],
    frontends: list[FakeFrontend],
    vm: str,
    size: int,
    **daemon_options: object,
) -> tuple[Daemon, GuestMemfd, FakeFrontend]:
    """A daemon serving one VM, and a guest of ``size`` bytes attached and started."""
    daemon = await start_daemon(vm, **daemon_options)
    guest = GuestMemfd(size)
    guests.append(guest)
    return daemon, guest, await attach(str(daemon.vms[0].socket), guest, frontends)
