"""The daemon's settings, from the command line and an optional TOML file, checked.

Every problem is found before anything starts and reported as ``ConfigError`` with
a message that names the option or the file key and what to write instead.
"""

from __future__ import annotations

import grp
import pwd
import re
import tomllib
from argparse import ArgumentTypeError
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from vhost_user_balloon.policy import PolicyConfig

__all__ = [
    "AUTO_KEYS",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_STATS_INTERVAL_S",
    "KEYS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_VMS",
    "Access",
    "AutoBalloon",
    "ConfigError",
    "Settings",
    "VmSpec",
    "config_keys_help",
    "load_settings",
    "parse_listen",
    "parse_size",
    "parse_vm",
]

DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9584"
#: How often the guest is asked for fresh statistics (QEMU's guest-stats-polling-interval
#: has no default; 5 s keeps the gauges current at a negligible cost to the guest).
DEFAULT_STATS_INTERVAL_S: Final = 5.0
#: VMs one daemon serves: each holds a socket, guest RAM mappings and eventfds; past
#: this, run a second daemon rather than one that is hard to reason about.
MAX_VMS: Final = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOG_FORMATS: Final = ("auto", "json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Key:
    """One setting of the TOML file: its type, its default and what it does. The
    command line's options and ``--help`` take their defaults and words from here."""

    name: str
    #: the TOML types accepted (a bool is never taken for a number)
    types: tuple[type, ...]
    default: object
    help: str

    @property
    def type_name(self) -> str:
        names = {bool: "true or false", str: "a string", int: "a whole number",
                 float: "a number", list: "an array", dict: "a table"}  # fmt: skip
        return " or ".join(names[t] for t in self.types)


#: Every key of the configuration file, in the order ``--help`` lists them.
KEYS: Final = {k.name: k for k in (
    Key("vm", (list,), [],
        "[[vm]] tables, each with name, socket and optionally discard, auto_balloon, min_memory"),
    Key("metrics_listen", (str,), DEFAULT_METRICS_LISTEN,
        "HOST:PORT for /metrics, [::1]:PORT for IPv6, or 'none'"),
    Key("log_format", (str,), "auto", f"one of {', '.join(LOG_FORMATS)}"),
    Key("log_level", (str,), "info", f"one of {', '.join(LOG_LEVELS)}"),
    Key("socket_mode", (str, int), "0600", 'permissions of the VM sockets, "0660" or 0o660'),
    Key("socket_group", (str, int), None, "group of the VM sockets, by name or number"),
    Key("allow_users", (list,), [], "users (names or uids) whose processes may connect"),
    Key("allow_groups", (list,), [],
        "groups (names or gids) whose processes may connect, as their primary or a "
        "supplementary group"),
    Key("discard", (bool,), True, "false: complete reports but never free guest memory"),
    Key("stats_interval", (int, float), DEFAULT_STATS_INTERVAL_S,
        "seconds between requests for guest statistics (0: ask once)"),
    Key("deflate_on_oom", (bool,), False, "offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM"),
    Key("control_socket", (str,), None, "path of the balloon control socket"),
    Key("auto_balloon", (dict,), {},
        "[auto_balloon] table: the automatic balloon policy (its keys below)"),
)}  # fmt: skip
#: Keys of the [auto_balloon] table. Sizes are bytes or strings such as "512M".
AUTO_KEYS: Final = {k.name: k for k in (
    Key("budget", (str, int), None,
        "the guests' host-resident RAM, summed, to hold under (setting it turns the policy on)"),
    Key("interval", (int, float), 10.0, "seconds between decisions"),
    Key("step", (str, int), "128M", "the most a VM's balloon moves per interval"),
    Key("margin", (str, int), "256M", "balloons deflate once this far under the budget"),
    Key("min_free", (str, int), "128M", "a guest's floor: at least this MemAvailable ..."),
    Key("min_free_percent", (int, float), 10.0, "... and at least this percentage of its RAM"),
    Key("host_psi_some", (int, float), 10.0,
        "host memory pressure (PSI some avg10, in percent) above which guests are inflated"),
    Key("host_min_available", (str, int), None,
        "host MemAvailable under which guests are inflated (unset: not used)"),
    Key("observe_only", (bool,), False, "log and count decisions, apply none"),
)}  # fmt: skip
#: Keys of one [[vm]] table.
VM_KEYS: Final = {k.name: k for k in (
    Key("name", (str,), None, "the VM's name (its metric label)"),
    Key("socket", (str,), None, "the socket QEMU connects to"),
    Key("discard", (bool,), True, "false for this VM alone (VFIO passthrough)"),
    Key("auto_balloon", (bool,), True, "false: the automatic balloon policy leaves it alone"),
    Key("min_memory", (str, int), 0, "the policy never leaves the guest less memory than this"),
)}  # fmt: skip


def config_keys_help() -> str:
    """One line per key of the configuration file, for ``--help``."""
    return "; ".join(f"{k.name} ({k.help})" for k in (*KEYS.values(), *AUTO_KEYS.values()))


def _typed(data: Mapping[str, object], key: Key, where: str) -> object:
    """The value of ``key`` in ``data``, or its default; a value of another type is an
    error naming the key, the value and the type expected."""
    if key.name not in data:
        return key.default
    value = data[key.name]
    if (isinstance(value, bool) and bool not in key.types) or not isinstance(value, key.types):
        raise ConfigError(
            f"{where}: {key.name} = {value!r} is {_article(value)}; expected {key.type_name}"
        )
    return value


def _article(value: object) -> str:
    kind = {bool: "a boolean", str: "a string", int: "a whole number", float: "a number",
            list: "an array", dict: "a table"}  # fmt: skip
    return kind.get(type(value), type(value).__name__)


class ConfigError(Exception):
    """A setting the daemon cannot start with; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One VM to serve: its name (a metric label) and the socket QEMU connects to."""

    name: str
    socket: Path
    discard: bool = True
    #: the automatic balloon policy may move this VM's balloon
    auto_balloon: bool = True
    #: ... but never leaves its guest less memory than this
    min_memory: int = 0


@dataclass(frozen=True, slots=True)
class AutoBalloon:
    """The automatic balloon policy's settings ([auto_balloon])."""

    policy: PolicyConfig
    #: compute, log and count decisions without applying them
    observe_only: bool = False


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use the VM sockets."""

    #: permissions of the socket files
    socket_mode: int = 0o600
    #: group given to the socket files (QEMU's group, e.g. kvm or libvirt-qemu)
    socket_gid: int | None = None
    #: if any is set, a peer must have one of these uids, or one of these gids as its
    #: primary or a supplementary group (SO_PEERCRED, SO_PEERGROUPS)
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    def allows(self, uid: int, gids: frozenset[int]) -> bool:
        """Whether a peer of this uid and these groups (its primary group and its
        supplementary ones) may connect."""
        if not (self.allow_uids or self.allow_gids):
            return True
        return uid in self.allow_uids or bool(gids & self.allow_gids)


@dataclass(frozen=True, slots=True)
class Settings:
    vms: tuple[VmSpec, ...]
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9584)
    log_format: str = "auto"
    log_level: str = "info"
    access: Access = Access()
    stats_interval: float = DEFAULT_STATS_INTERVAL_S
    deflate_on_oom: bool = False
    control_socket: Path | None = None
    #: None: the automatic balloon policy is off
    auto_balloon: AutoBalloon | None = None


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


def parse_size(text: str) -> int:
    """A size as people write it: 512M, 2G, 64MiB, 4096, 0 (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = text.rstrip("KMGkmgiIbB"), text[len(text.rstrip("KMGkmgiIbB")) :]
    unit = unit.upper().rstrip("IB")[:1]
    if not number.isdigit() or unit not in units:
        raise ArgumentTypeError(f"{text!r} is not a size such as 512M, 2G or 0")
    return int(number) * units[unit]


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
    """An octal mode: a string such as "0660", or a TOML number such as 0o660."""
    try:
        mode = value if isinstance(value, int) else int(str(value), 8)
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
    auto_budget: int | None = None,
    auto_observe_only: bool = False,
    auto_options: Sequence[str] = (),
) -> Settings:
    """Merge the TOML file (if any) and the command line; the command line wins."""
    where = f"--config {str(config_file)!r}"
    file = _read_file(config_file, where)
    discard_default = bool(file["discard"]) and not no_discard
    vms = [_file_vm(entry, discard_default, f"{where}: vm[{i}]")
           for i, entry in enumerate(_list(file, "vm", where))]  # fmt: skip
    vms.extend(parse_vm(text, discard=discard_default) for text in vm_args)
    # Socket activation: a socket systemd passed under a name nobody configured is a VM
    # of that name (FileDescriptorName= in the .socket unit).
    named = {vm.name for vm in vms}
    for name, path in (activated or {}).items():
        if name not in named:
            vms.append(VmSpec(name, Path(path), discard_default))
    _check_vms(vms)
    interval = stats_interval if stats_interval is not None else file["stats_interval"]
    if not isinstance(interval, int | float) or isinstance(interval, bool) or interval < 0:
        raise ConfigError(f"stats interval {interval!r}: give seconds >= 0 (0: ask once)")
    control = control_socket or file["control_socket"]
    control_path = Path(str(control)).absolute() if control else None
    if control_path is not None and not control_path.parent.is_dir():
        raise ConfigError(
            f"control socket {str(control_path)!r}: directory "
            f"{str(control_path.parent)!r} does not exist"
        )
    group = socket_group if socket_group is not None else file["socket_group"]
    return Settings(
        auto_balloon=_auto_balloon(
            {**_as_table(file["auto_balloon"]), **_auto_options(auto_options)},
            auto_budget,
            auto_observe_only,
            where,
        ),
        control_socket=control_path,
        stats_interval=float(interval),
        deflate_on_oom=deflate_on_oom or bool(file["deflate_on_oom"]),
        vms=tuple(vms),
        metrics_listen=parse_listen(str(metrics_listen or file["metrics_listen"])),
        log_format=_choice(log_format or file["log_format"], LOG_FORMATS, "log format"),
        log_level=_choice(log_level or file["log_level"], LOG_LEVELS, "log level"),
        access=Access(
            socket_mode=_mode(socket_mode or file["socket_mode"], "socket mode"),
            socket_gid=None if group is None else _id(group, "socket group", "group"),
            allow_uids=_ids([*_list(file, "allow_users", where), *allow_users], "user"),
            allow_gids=_ids([*_list(file, "allow_groups", where), *allow_groups], "group"),
        ),
    )


def _read_file(path: Path | None, where: str) -> dict[str, object]:
    """Every key of the configuration file (its default if absent), type-checked."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as err:
            raise ConfigError(f"{where}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{where}: not valid TOML: {err}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(KEYS)})")
    return {name: _typed(data, key, where) for name, key in KEYS.items()}


def _ids(values: Sequence[object], kind: str) -> frozenset[int]:
    return frozenset(_id(v, f"allowed {kind}", kind) for v in values)


def _file_vm(entry: object, discard_default: bool, where: str) -> VmSpec:
    """One [[vm]] table of the configuration file."""
    if not isinstance(entry, dict) or not {"name", "socket"} <= set(entry):
        raise ConfigError(f'{where}: needs name = "..." and socket = "/path"')
    extra = sorted(set(entry) - set(VM_KEYS))
    if extra:
        raise ConfigError(f"{where}: unknown keys {', '.join(extra)}")
    values = {name: _typed(entry, key, where) for name, key in VM_KEYS.items()}
    discard = bool(values["discard"]) and discard_default
    vm = _vm(str(values["name"]), str(values["socket"]), discard, where)
    return replace(
        vm,
        auto_balloon=bool(values["auto_balloon"]),
        min_memory=_bytes(values["min_memory"], f"{where}: min_memory"),
    )


def _bytes(value: object, where: str) -> int:
    """A size from the file: a whole number of bytes or a string such as "512M"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        return parse_size(str(value))
    except ArgumentTypeError:
        raise ConfigError(f'{where} = {value!r}: give bytes or a size such as "512M"') from None


def _as_table(value: object) -> dict[str, object]:
    assert isinstance(value, dict)  # _typed checked it
    return value


def _auto_options(options: Sequence[str]) -> dict[str, object]:
    """``--auto-balloon KEY=VALUE`` options as [auto_balloon] entries, typed by the key."""
    out: dict[str, object] = {}
    for text in options:
        name, sep, raw = text.partition("=")
        key = AUTO_KEYS.get(name)
        if not sep or key is None:
            raise ConfigError(
                f"--auto-balloon {text!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(AUTO_KEYS)}"
            )
        value: object = raw
        if bool in key.types:
            if raw not in ("true", "false"):
                raise ConfigError(f"--auto-balloon {text!r}: {name} is true or false")
            value = raw == "true"
        elif float in key.types:
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"--auto-balloon {text!r}: {name} is a number") from None
        out[name] = value
    return out


def _auto_balloon(
    table: object, budget: int | None, observe_only: bool, where: str
) -> AutoBalloon | None:
    """The [auto_balloon] table merged with the command line; None if no budget."""
    assert isinstance(table, dict)  # _typed checked it
    unknown = sorted(set(table) - set(AUTO_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: [auto_balloon] has unknown keys {', '.join(unknown)} "
            f"(known: {', '.join(AUTO_KEYS)})"
        )
    v = {name: _typed(table, key, f"{where}: [auto_balloon]") for name, key in AUTO_KEYS.items()}
    if budget is None and v["budget"] is None:
        return None
    size = {k: None if v[k] is None else _bytes(v[k], f"{where}: [auto_balloon] {k}")
            for k in ("budget", "step", "margin", "min_free", "host_min_available")}  # fmt: skip
    numbers = {k: float(v[k]) for k in ("interval", "min_free_percent", "host_psi_some")}  # type: ignore[arg-type]
    if numbers["interval"] <= 0 or not 0 <= numbers["min_free_percent"] <= 100:
        raise ConfigError(
            f"{where}: [auto_balloon] needs interval > 0 and min_free_percent from 0 to 100"
        )
    if not size["step"]:
        raise ConfigError(f"{where}: [auto_balloon] step must be more than 0")
    policy = PolicyConfig(
        budget_bytes=budget if budget is not None else int(size["budget"] or 0),
        interval_s=numbers["interval"],
        step_bytes=int(size["step"]),
        margin_bytes=int(size["margin"] or 0),
        min_free_bytes=int(size["min_free"] or 0),
        min_free_percent=numbers["min_free_percent"],
        host_psi_some=numbers["host_psi_some"],
        host_min_available_bytes=size["host_min_available"],
    )
    return AutoBalloon(policy, observe_only or bool(v["observe_only"]))


def _check_vms(vms: Sequence[VmSpec]) -> None:
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


def _list(values: Mapping[str, object], key: str, where: str) -> list[object]:
    """An array setting whose items are names or numbers (users, groups, vm tables)."""
    value = values[key]
    assert isinstance(value, list)  # _typed checked it
    if key != "vm" and not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise ConfigError(
            f'{where}: {key} = {value!r}: give names or numbers, e.g. {key} = ["kvm"]'
        )
    return value
