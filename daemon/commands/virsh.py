"""libvirt for the migration commands: QEMU's monitor through ``virsh
qemu-monitor-command`` for a domain whose monitor libvirt holds (a QMP socket serves
one client, and libvirt is it), and the domain's XML for the destination.

libvirt passes each command to QEMU and QEMU's answer back; it marks the domain
"tainted: custom-monitor", as it does for any command given this way.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from typing import Any, Final

from .qmp import QmpError

__all__ = ["QEMU_NS", "VirshMonitor", "without_balloon"]

#: libvirt's namespace for QEMU command-line arguments (<qemu:commandline>).
QEMU_NS: Final = "http://libvirt.org/schemas/domain/qemu/1.0"


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

    def dumpxml(self, *flags: str) -> str:
        """``virsh dumpxml FLAGS DOMAIN``: the domain's XML."""
        argv = ["virsh", "-q", *(["-c", self.connect] if self.connect else []),
                "dumpxml", *flags, self.domain]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise QmpError(f"virsh dumpxml {self.domain}: {done.stderr.strip()}")
        return done.stdout

    def close(self) -> None:
        """Nothing to close: each command is its own virsh."""

    def __enter__(self) -> VirshMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def without_balloon(domain_xml: str, device: str, chardev: str) -> str:
    """The domain's XML without the balloon's ``-chardev`` and ``-device`` (the
    ``<qemu:arg>`` pairs that name ``chardev`` and ``device`` as their id), everything
    else as it was, the device's root port included: the destination's live
    definition, since the device cannot be migrated and comes back by migrate-finish.
    ``QmpError`` if either pair is missing (the XML is not the shipped one)."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(domain_xml)
    line = root.find(f"{{{QEMU_NS}}}commandline")
    args = [] if line is None else list(line.findall(f"{{{QEMU_NS}}}arg"))
    wanted = {"-chardev": chardev, "-device": device}
    found: dict[str, int] = {}
    for i, (option, value) in enumerate(itertools.pairwise(args)):
        kind = option.get("value", "")
        if kind in wanted and _names(value.get("value", "")) == wanted[kind]:
            found[kind] = i
    missing = [f"{kind} with id {wanted[kind]}" for kind in wanted if kind not in found]
    if missing or line is None:
        raise QmpError(
            f"the domain's <qemu:commandline> has no {' and no '.join(missing)}: attach the "
            "balloon as the shipped libvirt-domain.xml does, or give --device/--chardev"
        )
    for i in sorted(found.values(), reverse=True):
        line.remove(args[i + 1])
        line.remove(args[i])
    return ET.tostring(root, encoding="unicode") + "\n"


def _names(value: str) -> str | None:
    """The id an option's value gives, in QEMU's JSON or key=value form."""
    if value.startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return str(parsed.get("id")) if isinstance(parsed, dict) else None
    for part in value.split(","):
        key, _, val = part.partition("=")
        if key == "id":
            return val
    return None
