"""vhost-user-balloon: a virtio-balloon backend for QEMU over vhost-user.

``vhost_user_balloon.protocol`` is the sans-IO core; ``vhost_user_balloon.daemon`` is
the trio program that serves QEMU and gives reported guest memory back to the host.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vhost-user-balloon")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
