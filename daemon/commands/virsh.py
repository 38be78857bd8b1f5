"""QEMU's monitor through libvirt: ``virsh qemu-monitor-command`` for a domain whose
monitor libvirt holds (a QMP socket serves one client, and libvirt is it).

libvirt passes each command to QEMU and QEMU's answer back; it marks the domain
"tainted: custom-monitor", as it does for any command given this way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

from .qmp import QmpError

__all__ = ["VirshMonitor"]


class VirshMonitor:
    """Runs QMP commands on a libvirt domain (``connect``: a libvirt URI, or None for
    virsh's default) and waits for a device to go by polling QEMU's device tree."""

    def __init__(self, domain: str, connect: str | None = None, timeout: float = 30.0) -> None:
        if shutil.which("virsh") is None:
            raise QmpError("virsh is not on PATH: --libvirt runs virsh qemu-monitor-command")
        self.domain, self.connect, self.timeout = domain, connect, timeout
        self.command("query-status")  # the domain exists and runs: say so now if not

    def command(self, name: str, **arguments: Any) -> Any:
        """One command; its ``return`` value, or ``QmpError`` with libvirt's or QEMU's
        words."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        argv = ["virsh", "-q", *(["-c", self.connect] if self.connect else []),
                "qemu-monitor-command", self.domain, json.dumps(request)]  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise QmpError(f"virsh did not answer {name} within {self.timeout:g} s") from None
        if done.returncode != 0:
            words = done.stderr.strip().removeprefix("error: ") or f"exit status {done.returncode}"
            raise QmpError(f"virsh qemu-monitor-command {self.domain} {name}: {words}")
        try:
            reply = json.loads(done.stdout)
        except ValueError:
            raise QmpError(f"virsh answered {name} with {done.stdout.strip()[:200]!r}") from None
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise QmpError(f"QEMU refused {name}: {desc}")
        return reply.get("return")

    def wait_device_gone(self, device: str, timeout: float) -> bool:
        """True once QEMU's device tree no longer has ``device`` (within ``timeout``):
        the guest let go of it and QEMU deleted it (libvirt keeps the event)."""
        deadline = time.monotonic() + timeout
        while True:
            listed = self.command("qom-list", path="/machine/peripheral")
            if device not in {p.get("name") for p in listed}:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def close(self) -> None:
        """Nothing to close: each command is its own virsh."""

    def __enter__(self) -> VirshMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
