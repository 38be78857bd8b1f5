"""The attach fragments users paste must say the same thing everywhere."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from testbed.guestrun import attach_args
from vhost_user_balloon.daemon.cli import build_parser
from vhost_user_balloon.daemon.commands.migrate import DEVICE
from vhost_user_balloon.protocol import CONFIG_MISSING_HELP, QEMU_DEVICE, qemu_device_option

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
        assert path.suffix in (".args", ".xml") or path.name == "README.md", (
            f"{path.name}: qemu-config/ holds only what users paste")  # fmt: skip
        if path.suffix in (".args", ".xml"):
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


_KEY_VALUE = re.compile(r"vhost-user-test-device-pci(,[^\s`'\\]+)")
_JSON = re.compile(r'\{"driver":\s*"vhost-user-test-device-pci"[^{}]*\}')
#: What may stand beside the balloon's own properties: where the device sits.
_PLACE = {"id", "bus", "chardev"}


def _device_mentions(text: str) -> list[dict[str, str]]:
    """Every -device of the balloon a text shows: key=value or QEMU's JSON form."""
    found = [dict(p.split("=", 1) for p in m.group(1).strip(",").split(","))
             for m in _KEY_VALUE.finditer(text)]  # fmt: skip
    for m in _JSON.finditer(text):
        props = json.loads(m.group(0))
        props.pop("driver")
        found.append({k: str(v) for k, v in props.items()})
    return found


def test_every_device_option_shipped_is_the_one_the_code_knows() -> None:
    """The balloon's QEMU properties have one source (QEMU_DEVICE): every .args file,
    the libvirt snippet and every block of README and qemu-config/README.md say them
    exactly, with nothing but where the device sits beside them."""
    own = {k: str(v) for k, v in QEMU_DEVICE.items() if k != "driver"}
    texts = {p.name: p.read_text() for p in QEMU_CONFIG.iterdir() if p.suffix in (".args", ".xml")}
    texts |= {"README.md": README.read_text(), "qemu-config/README.md":
              (QEMU_CONFIG / "README.md").read_text()}  # fmt: skip
    seen = 0
    for name, text in texts.items():
        for props in _device_mentions(text):
            seen += 1
            assert props.keys() - _PLACE == own.keys(), (name, props)
            assert {k: props[k] for k in own} == own, (name, props)
    assert seen >= 8  # the four .args and XML ones, README's several


def test_the_daemons_own_words_name_the_same_device() -> None:
    assert qemu_device_option(chardev="vb") in build_parser().format_help()
    assert qemu_device_option(chardev="...") in CONFIG_MISSING_HELP
    assert dict(QEMU_DEVICE) == DEVICE
