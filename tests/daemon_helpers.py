"""Helpers for tests that run the daemon in this process."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import trio
from frontend import FakeFrontend, GuestMemfd

from vhost_user_balloon.daemon import Daemon

StartDaemon = Callable[..., Coroutine[Any, Any, Daemon]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    """A daemon's /metrics page, as Prometheus reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(f"vhost_user_balloon_{name}", labels)
    return 0.0 if value is None else value


async def wait_disconnected(daemon: Daemon, vm: str, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while vm in daemon.connections:
            await trio.sleep(0.005)


async def attach(
    daemon_sock: str, guest: GuestMemfd, frontends: list[FakeFrontend], **start: object
) -> FakeFrontend:
    fe = await FakeFrontend.connect(daemon_sock, guest)
    frontends.append(fe)
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
