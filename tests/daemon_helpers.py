"""Helpers for tests that run the daemon in this process."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import trio

from vhost_user_balloon.daemon import Daemon

StartDaemon = Callable[..., Coroutine[Any, Any, Daemon]]


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(f"vhost_user_balloon_{name}", labels)
    return 0.0 if value is None else value


async def wait_disconnected(daemon: Daemon, vm: str, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while vm in daemon.connections:
            await trio.sleep(0.005)
