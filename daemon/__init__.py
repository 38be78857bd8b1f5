"""The vhost-user-balloon daemon: all the I/O around the sans-IO protocol package.

socket -> message -> session (``connection``) -> queue tasks (``queues``) -> guest
memory (``guestram``) -> discard (``discard``, ``syscalls``) -> metrics (``metrics``,
``http``); ``server`` holds the VMs together and ``cli`` is the command.
"""

from __future__ import annotations

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
