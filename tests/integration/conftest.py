"""The real daemon, in this process, on real unix sockets in a temporary folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_helpers import StartDaemon
from frontend import FakeFrontend, GuestMemfd

from vhost_user_balloon.daemon import Daemon, Metrics, VmSpec


@pytest.fixture
async def start_daemon(tmp_path: Path, nursery: trio.Nursery) -> StartDaemon:
    """Start a Daemon serving the named VMs (any other Daemon option passes through);
    it is cancelled when the test ends."""

    async def start(*names: str, discard: bool = True, **options: Any) -> Daemon:
        vms = [VmSpec(n, tmp_path / f"{n}.sock", discard) for n in names]
        daemon = Daemon(vms, metrics=Metrics(), **options)
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
