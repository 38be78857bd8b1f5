"""The vhost-user-balloon daemon: all the I/O around the sans-IO protocol package.

socket -> message -> session (``connection``) -> queue tasks (``queues``) -> guest
memory (``guestram``) -> discard (``discard``, ``syscalls``) -> metrics (``metrics``,
``http``); ``server`` holds the VMs together and ``cli`` is the command.

The names below are imported when first used: ``vhost-user-balloon supervise``
imports only its few helpers from this package, so that it starts in a fraction of
the time the daemon takes to import (a restart under systemd starts both).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConfigError, Settings, VmSpec, load_settings
    from .connection import VmConnection
    from .metrics import PREFIX, Metrics, VmMemoryStats
    from .server import Daemon, StartupError

__all__ = [
    "PREFIX",
    "ConfigError",
    "Daemon",
    "Metrics",
    "Settings",
    "StartupError",
    "VmConnection",
    "VmMemoryStats",
    "VmSpec",
    "load_settings",
]

_WHERE = {
    "ConfigError": ".config",
    "Settings": ".config",
    "VmSpec": ".config",
    "load_settings": ".config",
    "VmConnection": ".connection",
    "PREFIX": ".metrics",
    "Metrics": ".metrics",
    "VmMemoryStats": ".metrics",
    "Daemon": ".server",
    "StartupError": ".server",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
