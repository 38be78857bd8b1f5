"""The attach fragments users paste must say the same thing everywhere."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from testbed.guestrun import attach_args

QEMU_CONFIG = Path(__file__).resolve().parents[2] / "qemu-config"
README = Path(__file__).resolve().parents[2] / "README.md"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def test_libvirt_snippet_passes_the_same_device_as_the_args_file() -> None:
    # (libvirt itself starts a domain with it in tests/e2e/test_libvirt.py)
    args = attach_args("vhost-user-balloon", socket="/run/vhost-user-balloon/web1.sock", mem="2G")
    domain = ET.parse(QEMU_CONFIG / "libvirt-domain.xml").getroot()
    values = [str(a.get("value")) for a in domain.iter(f"{QEMU_NS}arg")]
    chardev = args[args.index("-chardev") : args.index("-chardev") + 2]
    at = values.index("-chardev")
    assert values[at : at + 2] == chardev
    assert values[at + 2] == "-device"
    driver, *props = args[args.index("-device") + 1].split(",")
    assert driver == "vhost-user-test-device-pci"
    as_json = json.loads(values[at + 3])
    assert as_json.pop("driver") == "vhost-user-test-device-pci" and as_json.pop("id") == "vub0"
    assert as_json.pop("bus") == json.loads(values[values.index("-device") + 1])["id"]
    assert {k: str(v) for k, v in as_json.items()} == dict(p.split("=", 1) for p in props)


def test_every_variant_keeps_config_size_16_and_shared_ram() -> None:
    for name in (
        "vhost-user-balloon",
        "vhost-user-balloon-hugetlbfs",
        "vhost-user-balloon-migratable",
    ):
        args = attach_args(name, socket="/s", mem="2G")
        joined = " ".join(args)
        assert "config_size=16" in joined and "virtio-id=5" in joined
        assert "share=on" in joined


def test_every_fragment_is_documented() -> None:
    table = (QEMU_CONFIG / "README.md").read_text()
    for path in QEMU_CONFIG.iterdir():
        if path.suffix in (".args", ".xml", ".py", ".sh") or path.name == "provision":
            assert f"`{path.name}`" in table, path.name


def test_readme_shows_the_args_files_as_they_are() -> None:
    """README's blocks show these files (which the e2e tests give QEMU as they are)."""
    text = README.read_text()
    values = {"mem": "2G", "socket": "/run/vhost-user-balloon/web1.sock",
              "size": "2G", "requested": "1G"}  # fmt: skip
    for name in ("vhost-user-balloon.args", "virtio-mem.args"):
        for line in (QEMU_CONFIG / name).read_text().splitlines():
            if line and not line.startswith("#"):
                option = line.split(" ", 1)[1].format(**values)
                assert option in text, (name, option)
