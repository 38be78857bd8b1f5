"""The daemon's settings, from the command line and an optional TOML file, checked.

Every problem is found before anything starts and reported as ``ConfigError`` with
a message that names the option or the file key and what to write instead.
"""

from __future__ import annotations

import grp
import pwd
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_METRICS_LISTEN",
    "MAX_VMS",
    "Access",
    "ConfigError",
    "Settings",
    "VmSpec",
    "load_settings",
    "parse_listen",
    "parse_vm",
]

DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9584"
#: VMs one daemon serves: each holds a socket, guest RAM mappings and eventfds; past
#: this, run a second daemon rather than one that is hard to reason about.
MAX_VMS: Final = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOG_FORMATS = ("auto", "json", "console")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting the daemon cannot start with; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One VM to serve: its name (a metric label) and the socket QEMU connects to."""

    name: str
    socket: Path
    discard: bool = True


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use the VM sockets."""

    #: permissions of the socket files
    socket_mode: int = 0o600
    #: group given to the socket files (QEMU's group, e.g. kvm or libvirt-qemu)
    socket_gid: int | None = None
    #: if any is set, a peer must have one of these uids or gids (SO_PEERCRED)
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    def allows(self, uid: int, gid: int) -> bool:
        if not (self.allow_uids or self.allow_gids):
            return True
        return uid in self.allow_uids or gid in self.allow_gids


@dataclass(frozen=True, slots=True)
class Settings:
    vms: tuple[VmSpec, ...]
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9584)
    log_format: str = "auto"
    log_level: str = "info"
    access: Access = Access()
    stats_interval: float = 5.0
    deflate_on_oom: bool = False
    control_socket: Path | None = None


def parse_vm(text: str, *, discard: bool = True) -> VmSpec:
    """``NAME=SOCKET_PATH`` -> ``VmSpec``."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"--vm {text!r}: expected NAME=SOCKET_PATH, e.g. web1=/run/vub/web1.sock")
    return _vm(name, path, discard, f"--vm {text!r}")


def _vm(name: str, path: str, discard: bool, where: str) -> VmSpec:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: VM name {name!r} must be 1-64 letters, digits, '_', '.' or '-' "
            "(it becomes the vm label of every metric)"
        )
    socket = Path(path)
    if not socket.is_absolute():
        socket = Path.cwd() / socket
    if len(bytes(socket)) > 107:
        raise ConfigError(
            f"{where}: socket path {str(socket)!r} is longer than the 107 bytes "
            "a unix socket address can hold"
        )
    if not socket.parent.is_dir():
        raise ConfigError(
            f"{where}: directory {str(socket.parent)!r} does not exist; create it "
            "first (the daemon does not create directories)"
        )
    return VmSpec(name, socket, discard)


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9584`` for IPv6) or ``none`` -> address or None."""
    if text.lower() in ("none", "off", ""):
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"--metrics-listen {text!r}: expected HOST:PORT such as "
            f"{DEFAULT_METRICS_LISTEN} or [::1]:9584, or 'none'"
        )
    return host, int(port)


def _mode(value: object, where: str) -> int:
    try:
        mode = int(str(value), 8)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an octal file mode such as 0600") from None
    if mode & ~0o777:
        raise ConfigError(f"{where}: {value!r} is not a permission mode (0000 to 0777)")
    return mode


def _id(value: object, where: str, kind: str) -> int:
    """A user or group, by number or by name."""
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid if kind == "group" else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"{where}: no {kind} named {text!r} on this system") from None


def _choice(value: object, allowed: Sequence[str], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def load_settings(
    *,
    vm_args: Sequence[str] = (),
    config_file: Path | None = None,
    metrics_listen: str | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    socket_mode: str | None = None,
    socket_group: str | None = None,
    allow_users: Sequence[str] = (),
    allow_groups: Sequence[str] = (),
    no_discard: bool = False,
    stats_interval: float | None = None,
    deflate_on_oom: bool = False,
    control_socket: str | None = None,
    activated: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the TOML file (if any) and the command line; the command line wins."""
    data: dict[str, object] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except OSError as err:
            raise ConfigError(f"--config {str(config_file)!r}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config {str(config_file)!r}: not valid TOML: {err}") from None
    known = {
        "vm",
        "metrics_listen",
        "log_format",
        "log_level",
        "socket_mode",
        "discard",
        "socket_group",
        "stats_interval",
        "deflate_on_oom",
        "control_socket",
        "allow_users",
        "allow_groups",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{config_file}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    discard_default = bool(data.get("discard", True)) and not no_discard
    vms: list[VmSpec] = []
    file_vms = data.get("vm", [])
    if not isinstance(file_vms, list):
        raise ConfigError(f"{config_file}: 'vm' must be an array of tables ([[vm]])")
    for i, entry in enumerate(file_vms):
        where = f"{config_file}: vm[{i}]"
        if not isinstance(entry, dict) or not {"name", "socket"} <= set(entry):
            raise ConfigError(f'{where}: needs name = "..." and socket = "/path"')
        extra = sorted(set(entry) - {"name", "socket", "discard"})
        if extra:
            raise ConfigError(f"{where}: unknown keys {', '.join(extra)}")
        discard = bool(entry.get("discard", True)) and discard_default
        vms.append(_vm(str(entry["name"]), str(entry["socket"]), discard, where))
    vms.extend(parse_vm(text, discard=discard_default) for text in vm_args)
    # Socket activation: a socket systemd passed under a name nobody configured is a VM
    # of that name (FileDescriptorName= in the .socket unit).
    named = {vm.name for vm in vms}
    for name, path in (activated or {}).items():
        if name not in named:
            vms.append(VmSpec(name, Path(path), discard_default))
    if not vms:
        raise ConfigError(
            "no VM to serve: give --vm NAME=SOCKET_PATH (repeatable), a --config file "
            "with [[vm]] entries, or sockets through systemd socket activation"
        )
    if len(vms) > MAX_VMS:
        raise ConfigError(f"{len(vms)} VMs configured; one daemon serves at most {MAX_VMS}")
    for attr in ("name", "socket"):
        seen: set[object] = set()
        for vm in vms:
            value = getattr(vm, attr)
            if value in seen:
                raise ConfigError(f"two VMs share the {attr} {str(value)!r}; each needs its own")
            seen.add(value)
    listen = (
        metrics_listen
        if metrics_listen is not None
        else data.get("metrics_listen", DEFAULT_METRICS_LISTEN)
    )
    interval = stats_interval if stats_interval is not None else data.get("stats_interval", 5.0)
    if not isinstance(interval, int | float) or isinstance(interval, bool) or interval < 0:
        raise ConfigError(f"stats interval {interval!r}: give seconds >= 0 (0: ask once)")
    control = control_socket or data.get("control_socket")
    control_path = Path(str(control)).absolute() if control else None
    if control_path is not None and not control_path.parent.is_dir():
        raise ConfigError(
            f"control socket {str(control_path)!r}: directory "
            f"{str(control_path.parent)!r} does not exist"
        )
    return Settings(
        control_socket=control_path,
        stats_interval=float(interval),
        deflate_on_oom=deflate_on_oom or bool(data.get("deflate_on_oom", False)),
        vms=tuple(vms),
        metrics_listen=parse_listen(str(listen)),
        log_format=_choice(
            log_format or data.get("log_format", "auto"), _LOG_FORMATS, "log format"
        ),
        log_level=_choice(log_level or data.get("log_level", "info"), _LOG_LEVELS, "log level"),
        access=Access(
            socket_mode=_mode(socket_mode or data.get("socket_mode", "0600"), "socket mode"),
            socket_gid=(
                None
                if (g := socket_group or data.get("socket_group")) is None
                else _id(g, "socket group", "group")
            ),
            allow_uids=frozenset(
                _id(u, "allowed user", "user") for u in [*_list(data, "allow_users"), *allow_users]
            ),
            allow_gids=frozenset(
                _id(g, "allowed group", "group")
                for g in [*_list(data, "allow_groups"), *allow_groups]
            ),
        ),
    )


def _list(data: dict[str, object], key: str) -> list[object]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f'{key} must be a list, e.g. {key} = ["kvm"]')
    return value
