"""The real daemon, in this process, on real unix sockets in a temporary folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.daemon_helpers import Logs, RunCommand, StartDaemon, settings_for
from tests.daemon_helpers import children as list_children
from tests.frontend import FakeFrontend, GuestMemfd
from vhost_user_balloon.daemon.config import VmSpec
from vhost_user_balloon.daemon.observing.metrics import Metrics
from vhost_user_balloon.daemon.server import Daemon
from vhost_user_balloon.daemon.serving.passthrough import VFIO_MARKERS


@pytest.fixture
def run_command(tmp_path: Path) -> Iterator[RunCommand]:
    """Run the installed command (``python -m vhost_user_balloon ARGS``) in its own
    process; whatever is still running when the test ends is killed, children too."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Logs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhost_user_balloon", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        procs.append(proc)
        return Logs(proc)

    yield start
    for p in procs:
        if p.poll() is None:
            children = list_children(p.pid)  # before the kill: then they are orphans
            p.kill()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        p.wait()


@pytest.fixture
async def start_daemon(tmp_path: Path, nursery: trio.Nursery) -> StartDaemon:
    """Start a Daemon serving the named VMs (``settings``: any field of Settings);
    it is cancelled when the test ends."""

    async def start(
        *names: str,
        discard: bool = True,
        passthrough_markers: tuple[str, ...] = VFIO_MARKERS,
        **settings: Any,
    ) -> Daemon:
        vms = [VmSpec(n, tmp_path / f"{n}.sock", discard) for n in names]
        daemon = Daemon(
            settings_for(vms, **settings),
            metrics=Metrics(),
            passthrough_markers=passthrough_markers,
        )
        await nursery.start(daemon.run)
        return daemon

    return start


@pytest.fixture
async def guests() -> AsyncIterator[list[GuestMemfd]]:
    made: list[GuestMemfd] = []
    yield made
    for g in made:
        g.close()


@pytest.fixture
async def frontends() -> AsyncIterator[list[FakeFrontend]]:
    made: list[FakeFrontend] = []
    yield made
    for f in made:
        await f.aclose()
