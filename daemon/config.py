"""The daemon's settings, in one table: the configuration file, the command line and
``--help`` are all read from it, and the daemon takes the result whole (``Settings``).

Theory of operation. Each ``Setting`` row names a key of the TOML file, the types that
key takes there, its default, what it does, and the command-line option that sets it
(if any). An option's text is turned into the value the file would hold for that key
(``--no-discard`` is ``discard = false``, ``--vm web1=PATH`` one more ``[[vm]]``
table, ``--auto-balloon step=64M`` the ``step`` of ``[auto_balloon]``), so both go
through the same checks: the file's values are checked for their type first, then
merged with the options' (an option wins; lists such as ``allow_groups`` add up), then
each row's ``check`` turns its value into what the daemon uses and says what is wrong
if it cannot. Every problem is found before anything starts and reported as a
``ConfigError`` that names the option or the key and what to write instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import pwd
import re
import textwrap
import tomllib
from argparse import ArgumentTypeError
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from vhost_user_balloon.policy import DEFAULT_SHARES, PolicyConfig

__all__ = [
    "AUTO_BALLOON",
    "DEFAULT_METRICS_LISTEN",
    "DEFAULT_STATS_INTERVAL_S",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_VMS",
    "SETTINGS",
    "VM",
    "AutoBalloon",
    "ConfigError",
    "Setting",
    "Settings",
    "SocketAccess",
    "VmSpec",
    "add_options",
    "load_settings",
    "parse_size",
]

DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9584"
#: How often the guest is asked for fresh statistics (QEMU's guest-stats-polling-interval
#: has no default; 5 s keeps the gauges current at a negligible cost to the guest).
DEFAULT_STATS_INTERVAL_S: Final = 5.0
#: VMs one daemon serves: each holds a socket, guest RAM mappings and eventfds; past
#: this, run a second daemon rather than one that is hard to reason about.
MAX_VMS: Final = 256
#: The longest path a unix socket address holds (sun_path less its NUL).
_MAX_SOCKET_PATH: Final = 107
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LOG_FORMATS: Final = ("auto", "json", "console")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
MiB: Final = 1 << 20


class ConfigError(Exception):
    """A setting the daemon cannot start with; the message says how to fix it."""


# -- what the daemon takes -------------------------------------------------------------
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
    #: its weight when several VMs can give memory back (more: asked later)
    shares: int = DEFAULT_SHARES


@dataclass(frozen=True, slots=True)
class AutoBalloon:
    """The automatic balloon policy's settings ([auto_balloon])."""

    policy: PolicyConfig
    #: compute, log and count decisions without applying them
    observe_only: bool = False


@dataclass(frozen=True, slots=True)
class SocketAccess:
    """Who may use the VM sockets."""

    #: permissions of the socket files
    mode: int = 0o600
    #: group given to the socket files (QEMU's group, e.g. kvm or libvirt-qemu)
    gid: int | None = None
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
    """Everything the daemon is told, checked; one field per row of ``SETTINGS`` (their
    defaults live there, and nowhere else)."""

    vms: tuple[VmSpec, ...]
    metrics_listen: tuple[str, int] | None
    log_format: str
    log_level: str
    socket_mode: int
    socket_gid: int | None
    allow_uids: frozenset[int]
    allow_gids: frozenset[int]
    #: False: no VM's memory is discarded (each VM's own ``discard`` is folded in)
    discard: bool
    stats_interval: float
    deflate_on_oom: bool
    control_socket: Path | None
    #: None: the automatic balloon policy is off
    auto_balloon: AutoBalloon | None

    @property
    def access(self) -> SocketAccess:
        return SocketAccess(self.socket_mode, self.socket_gid, self.allow_uids, self.allow_gids)


# -- values as people write them --------------------------------------------------------
def parse_size(text: str) -> int:
    """A size as people write it: 512M, 2G, 64MiB, 4096, 0 (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = text.rstrip("KMGkmgiIbB"), text[len(text.rstrip("KMGkmgiIbB")) :]
    unit = unit.upper().rstrip("IB")[:1]
    if not number.isdigit() or unit not in units:
        raise ArgumentTypeError(f"{text!r} is not a size such as 512M, 2G or 0")
    return int(number) * units[unit]


def _size_text(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _size(value: object, where: str) -> int:
    """A size from the file: a whole number of bytes or a string such as "512M"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        return parse_size(str(value))
    except ArgumentTypeError:
        raise ConfigError(f'{where} = {value!r}: give bytes or a size such as "512M"') from None


def _optional_size(value: object, where: str) -> int | None:
    return None if value is None else _size(value, where)


def _listen(value: object, where: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9584`` for IPv6) or ``none`` -> address or None."""
    text = str(value)
    if text.lower() in ("none", "off", ""):
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"{where} {text!r}: expected HOST:PORT such as {DEFAULT_METRICS_LISTEN} or "
            "[::1]:9584, or 'none'"
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


def _id(value: object, where: str, kind: Literal["user", "group"]) -> int:
    """A user or group, by number or by name."""
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid if kind == "group" else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"{where}: no {kind} named {text!r} on this system") from None


def _group(value: object, where: str) -> int | None:
    return None if value is None else _id(value, where, "group")


def _ids(kind: Literal["user", "group"]) -> Callable[[object, str], frozenset[int]]:
    def check(values: object, where: str) -> frozenset[int]:
        assert isinstance(values, list)  # typed already
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f'{where} = {values!r}: give names or numbers, e.g. ["kvm"]')
        return frozenset(_id(v, f"allowed {kind}", kind) for v in values)

    return check


def _choice(allowed: Sequence[str]) -> Callable[[object, str], str]:
    def check(value: object, where: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
        return str(value)

    return check


def _seconds(value: object, where: str) -> float:
    number = float(value)  # type: ignore[arg-type]  # typed already: int or float
    if number < 0:
        raise ConfigError(f"{where} = {value!r}: give seconds >= 0 (0: ask once)")
    return number


def _interval(value: object, where: str) -> float:
    number = float(value)  # type: ignore[arg-type]  # typed already: int or float
    if number <= 0:
        raise ConfigError(f"{where} = {value!r}: give interval > 0 seconds")
    return number


def _number(value: object, where: str) -> float:
    return float(value)  # type: ignore[arg-type]  # typed already: int or float


def _percent(value: object, where: str) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not 0 <= number <= 100:
        raise ConfigError(f"{where} = {value!r}: min_free_percent goes from 0 to 100")
    return number


def _step(value: object, where: str) -> int:
    size = _size(value, where)
    if not size:
        key = where.rsplit(".", 1)[-1].rsplit(" ", 1)[-1]
        raise ConfigError(f"{where} = {value!r}: {key} must be more than 0")
    return size


#: Proxmox's range for the same weight.
_MAX_SHARES: Final = 50000


def _shares(value: object, where: str) -> int:
    assert isinstance(value, int)  # typed already
    if not 1 <= value <= _MAX_SHARES:
        raise ConfigError(
            f"{where} = {value!r}: shares go from 1 to {_MAX_SHARES} (1000 by default; to "
            "keep the policy off this VM, auto_balloon = false)"
        )
    return value


def _socket_path(value: object, where: str) -> Path:
    path = Path(str(value))
    if not path.is_absolute():
        path = Path.cwd() / path
    if len(bytes(path)) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"{where}: socket path {str(path)!r} is longer than the {_MAX_SOCKET_PATH} "
            "bytes a unix socket address can hold"
        )
    if not path.parent.is_dir():
        raise ConfigError(
            f"{where}: directory {str(path.parent)!r} does not exist; create it first (the "
            "daemon does not create directories)"
        )
    return path


def _control_socket(value: object, where: str) -> Path | None:
    return None if value is None else _socket_path(value, where)


def _vm_name(value: object, where: str) -> str:
    if not _NAME.fullmatch(str(value)):
        raise ConfigError(
            f"{where}: VM name {value!r} must be 1-64 letters, digits, '_', '.' or '-' (it "
            "becomes the vm label of every metric)"
        )
    return str(value)


class _OptionTable(dict[str, object]):
    """A table the command line stands for, with the option that said it."""

    def __init__(self, values: dict[str, object], where: str) -> None:
        super().__init__(values)
        self.where = where


def _vm_option(text: str) -> dict[str, object]:
    """``--vm NAME=SOCKET_PATH`` as the [[vm]] table it stands for."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"--vm {text!r}: expected NAME=SOCKET_PATH, e.g. web1=/run/vub/web1.sock")
    return _OptionTable({"name": name, "socket": path}, f"--vm {text!r}")


def _keep(value: object, where: str) -> object:
    return value


# -- the table ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its key in the file, the option that sets it, and all ``--help``
    says of it."""

    key: str
    #: the TOML types accepted (a bool is never taken for a number)
    types: tuple[type, ...]
    default: object
    help: str
    #: what the daemon uses, from the merged value (raises ConfigError)
    check: Callable[[object, str], object] = _keep
    #: the field of the object it fills (Settings, VmSpec, PolicyConfig); default: key
    field: str | None = None
    #: the command-line option, or None: the file only
    option: str | None = None
    metavar: str | None = None
    #: "value": the option's text is the value; "list": each use adds an item;
    #: "flag": the option alone sets ``flag_value``
    action: Literal["value", "list", "flag"] = "value"
    flag_value: object = True
    #: an option's text -> the value the file would hold (default: the text itself)
    parse: Callable[[str], object] | None = None
    #: choices the option offers in --help
    choices: tuple[str, ...] | None = None

    @property
    def target(self) -> str:
        return self.field or self.key

    def type_name(self) -> str:
        """What the key takes, as an error says it ("a string or a whole number")."""
        return " or ".join("true or false" if t is bool else _KINDS[t] for t in self.types)


#: What each TOML type is called in errors.
_KINDS: Final = {bool: "a boolean", str: "a string", int: "a whole number", float: "a number",
                 list: "an array", dict: "a table"}  # fmt: skip


def _policy_default(name: str) -> object:
    """The policy's own default for one of its knobs (policy/auto.py keeps them)."""
    return next(f.default for f in dataclasses.fields(PolicyConfig) if f.name == name)


# Declaration tables (each row one setting, as --help prints them): long by nature.
#: [[vm]] tables: one VM each (or --vm NAME=SOCKET_PATH).
VM: Final = (
    Setting("name", (str,), None, "the VM's name, its metric label", _vm_name),
    Setting("socket", (str,), None, "the socket QEMU connects to", _socket_path),
    Setting("discard", (bool,), True, "false for this VM alone (VFIO passthrough)"),
    Setting("auto_balloon", (bool,), True,
            "false: the automatic balloon policy leaves this VM alone"),
    Setting("min_memory", (str, int), 0,
            "the policy never leaves the guest less memory than this", _size),
    Setting("shares", (int,), DEFAULT_SHARES,
            "the VM's weight when several can give memory back: more shares, asked "
            "later (1 to 50000)", _shares),
)  # fmt: skip
#: [auto_balloon]: the automatic balloon policy (its fields are PolicyConfig's).
AUTO_BALLOON: Final = (
    Setting("budget", (str, int), None,
            "hold the guests' host-resident RAM, summed, under SIZE (e.g. 6G): setting it "
            "turns the automatic balloon policy on", _optional_size, "budget_bytes",
            "--auto-balloon-budget", "SIZE"),
    Setting("interval", (int, float), _policy_default("interval_s"),
            "seconds between decisions", _interval, "interval_s"),
    Setting("step", (str, int), _policy_default("step_bytes"),
            "how far a balloon deflates per interval, and the band above a guest's floor "
            "where inflating stops", _step, "step_bytes"),
    Setting("max_reclaim", (str, int), _policy_default("max_reclaim_bytes"),
            "the most resident memory one VM is asked to give per interval", _step,
            "max_reclaim_bytes"),
    Setting("margin", (str, int), _policy_default("margin_bytes"),
            "balloons deflate once this far under the budget", _size, "margin_bytes"),
    Setting("min_free", (str, int), _policy_default("min_free_bytes"),
            "a guest's floor: at least this MemAvailable ...", _size, "min_free_bytes"),
    Setting("min_free_percent", (int, float), _policy_default("min_free_percent"),
            "... and at least this percentage of its RAM", _percent),
    Setting("host_psi_some", (int, float), _policy_default("host_psi_some"),
            "host memory pressure (PSI some avg10, in percent) above which guests are "
            "inflated", _number),
    Setting("host_min_available", (str, int), _policy_default("host_min_available_bytes"),
            "host MemAvailable under which guests are inflated (unset: not used)",
            _optional_size, "host_min_available_bytes"),
    Setting("observe_only", (bool,), False,
            "the policy logs and counts its decisions but applies none",
            option="--auto-balloon-observe-only", action="flag"),
)  # fmt: skip


def _vms(tables: object, where: str) -> tuple[VmSpec, ...]:
    assert isinstance(tables, list)  # typed already
    return tuple(
        _vm(entry, getattr(entry, "where", f"{where}[{i}]")) for i, entry in enumerate(tables)
    )


def _vm(entry: object, where: str) -> VmSpec:
    """One [[vm]] table of the file, or one --vm."""
    if not isinstance(entry, dict) or not {"name", "socket"} <= set(entry):
        raise ConfigError(f'{where}: needs name = "..." and socket = "/path"')
    values = _checked_table(entry, VM, where, {})
    return VmSpec(**values)


def _auto_balloon(table: object, where: str) -> AutoBalloon | None:
    """The [auto_balloon] table; None (the policy is off) without a budget."""
    assert isinstance(table, dict)  # typed already
    values = _checked_table(table, AUTO_BALLOON, where, {})
    observe_only = bool(values.pop("observe_only"))
    if values["budget_bytes"] is None:
        return None
    return AutoBalloon(PolicyConfig(**values), observe_only)


#: Every key of the file, in the order --help lists them.
SETTINGS: Final = (
    Setting("vm", (list,), [],
            "serve a VM: NAME is its metric label, SOCKET_PATH the unix socket the daemon "
            "listens on and QEMU's -chardev socket connects to (repeatable; in the file: "
            "[[vm]] tables with the keys below)", _vms, "vms", "--vm", "NAME=SOCKET_PATH",
            "list", parse=_vm_option),
    Setting("metrics_listen", (str,), DEFAULT_METRICS_LISTEN,
            "where to serve /metrics for Prometheus ('none' to disable; [::1]:PORT for "
            "IPv6)", _listen, option="--metrics-listen", metavar="HOST:PORT"),
    Setting("log_format", (str,), "auto",
            "log lines as JSON or for people (auto: JSON unless stdout is a terminal)",
            _choice(LOG_FORMATS), option="--log-format", choices=LOG_FORMATS),
    Setting("log_level", (str,), "info", "least severe level logged (debug logs every report)",
            _choice(LOG_LEVELS), option="--log-level", choices=LOG_LEVELS),
    Setting("socket_mode", (str, int), "0600",
            "permissions of the VM sockets (0600: only the daemon's user; QEMU must run as "
            "that user or be given access; in the file \"0660\" or 0o660)", _mode,
            option="--socket-mode", metavar="OCTAL"),
    Setting("socket_group", (str, int), None,
            "group of the VM sockets, e.g. kvm or libvirt-qemu (with socket mode 0660)",
            _group, "socket_gid", "--socket-group", "GROUP"),
    Setting("allow_users", (list,), [],
            "accept connections only from processes of this user (name or uid; "
            "repeatable; checked with SO_PEERCRED). Without allowed users or groups, the "
            "socket permissions decide", _ids("user"), "allow_uids", "--allow-user", "USER",
            "list"),
    Setting("allow_groups", (list,), [],
            "accept connections from processes that have this group, as their primary or "
            "a supplementary group (name or gid; repeatable); e.g. kvm for QEMU under "
            "libvirt", _ids("group"), "allow_gids", "--allow-group", "GROUP", "list"),
    Setting("discard", (bool,), True,
            "complete and count reports but never free guest memory: for guest memory "
            "pinned in ways the daemon cannot see (a VFIO device in QEMU is noticed by "
            "itself, from QEMU's open files)",
            option="--no-discard", action="flag", flag_value=False),
    Setting("stats_interval", (int, float), DEFAULT_STATS_INTERVAL_S,
            "how often to ask guests for fresh memory statistics, in seconds, exported as "
            "vhost_user_balloon_guest_* metrics (0 keeps the first numbers)", _seconds,
            option="--stats-interval", metavar="SECONDS", parse=float),
    Setting("deflate_on_oom", (bool,), False,
            "offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: a guest about to run out of memory "
            "takes pages back from the balloon by itself (its MemTotal then does not "
            "shrink when the balloon grows)", option="--deflate-on-oom", action="flag"),
    Setting("control_socket", (str,), None,
            "serve the balloon control socket here (mode 0600): 'vhost-user-balloon "
            "balloon VM SIZE' sets how much memory a guest gives up", _control_socket,
            option="--control-socket", metavar="PATH"),
    Setting("auto_balloon", (dict,), {},
            "any setting of the automatic balloon policy (repeatable), e.g. step=256M or "
            "interval=5; in the file, the [auto_balloon] table with the keys below",
            _auto_balloon, option="--auto-balloon", metavar="KEY=VALUE", action="list"),
)  # fmt: skip
_BY_KEY: Final = {s.key: s for s in SETTINGS}
_AUTO_BY_KEY: Final = {s.key: s for s in AUTO_BALLOON}


# -- reading the file ----------------------------------------------------------------------
def _typed(data: Mapping[str, object], row: Setting, where: str) -> object:
    """The value of ``row`` in ``data``, or its default; a value of another type is an
    error naming the key, the value and the type expected."""
    if row.key not in data:
        return row.default
    value = data[row.key]
    if (isinstance(value, bool) and bool not in row.types) or not isinstance(value, row.types):
        article = _KINDS.get(type(value), type(value).__name__)
        raise ConfigError(
            f"{where}: {row.key} = {value!r} is {article}; expected {row.type_name()}"
        )
    return value


def _checked_table(
    data: Mapping[str, object], rows: Sequence[Setting], where: str, given: Mapping[str, object]
) -> dict[str, Any]:
    """Every row's value from ``data`` (a table of the file) with ``given`` (from the
    command line) over it, checked and converted, by field."""
    unknown = sorted(set(data) - {r.key for r in rows})
    if unknown:
        known = ", ".join(r.key for r in rows)
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)} (known: {known})")
    out: dict[str, Any] = {}
    for row in rows:
        value = _typed(data, row, where)
        source = f"{where}: {row.key}" if data else row.key
        if row.key in given:
            value = _merge(value, given[row.key])
            source = row.option or source
        out[row.target] = row.check(value, source)
    return out


def _merge(file: object, option: object) -> object:
    """An option's value over the file's: lists add up, tables merge key by key, any
    other value is replaced."""
    if isinstance(file, list) and isinstance(option, list):
        return [*file, *option]
    if isinstance(file, dict) and isinstance(option, dict):
        return {**file, **option}
    return option


def _read_file(path: Path | None) -> dict[str, object]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"--config {str(path)!r}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {str(path)!r}: not valid TOML: {err}") from None


# -- the command line ------------------------------------------------------------------------
def _default_text(row: Setting) -> str | None:
    if row.default in (None, [], {}) or row.action == "flag":
        return None
    if row.types == (str, int) and isinstance(row.default, int):
        return f"default {_size_text(row.default)}"
    if isinstance(row.default, bool):
        return f"default {str(row.default).lower()}"
    if isinstance(row.default, float):
        return f"default {row.default:g}"
    return f"default {row.default}"


def _file_text(row: Setting) -> str:
    where = f"[auto_balloon] {row.key}" if row in AUTO_BALLOON else row.key
    if row.action == "flag":
        return f"file: {where} = {str(row.flag_value).lower()}"
    return f"file: {where}"


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per row that has one, its words and default from the row; the keys
    of the file, in the epilog."""
    for row in (*SETTINGS, *AUTO_BALLOON):
        if row.option is None:
            continue
        notes = [n for n in (_default_text(row), _file_text(row)) if n]
        words = f"{row.help} ({'; '.join(notes)})"
        if row.action == "flag":
            parser.add_argument(row.option, action="store_true", help=words)
        else:
            parser.add_argument(
                row.option, metavar=row.metavar, choices=row.choices, help=words,
                action="append" if row.action == "list" else "store",
            )  # fmt: skip


def keys_help() -> str:
    """The file's keys, for --help: those with an option say which; the others what
    they do."""

    def line(row: Setting, prefix: str = "") -> str:
        if row.action == "flag":
            said = f"{row.key} = {str(row.flag_value).lower()} is {row.option}"
        elif row.option:
            said = f"{row.key}: as {row.option}"
        else:
            default = _default_text(row)
            said = f"{row.key}: {row.help}" + (f" ({default})" if default else "")
        return textwrap.fill(
            prefix + said, width=88, initial_indent="  ", subsequent_indent="      "
        )

    rows = [line(r) for r in SETTINGS]
    rows += [line(r, "[[vm]] ") for r in VM]
    rows += [line(r, "[auto_balloon] ") for r in AUTO_BALLOON]
    return "\n".join(rows)


def _given(args: argparse.Namespace) -> dict[str, object]:
    """What the options set, as the values the file would hold for those keys."""
    given: dict[str, object] = {}
    auto: dict[str, object] = {}
    for text in getattr(args, "auto_balloon", None) or ():
        key, value = _auto_option(text)
        auto[key] = value
    for row in (*SETTINGS, *AUTO_BALLOON):
        if row.option is None or row.key == "auto_balloon":
            continue
        raw = getattr(args, row.option.lstrip("-").replace("-", "_"), None)
        if raw in (None, False, []):
            continue
        (auto if row in AUTO_BALLOON else given)[row.key] = _option_value(row, raw)
    if auto:
        given["auto_balloon"] = auto
    return given


def _option_value(row: Setting, raw: object) -> object:
    """What an option set, as the file's value for its key."""
    if row.action == "flag":
        return row.flag_value
    items = raw if row.action == "list" else [raw]
    assert isinstance(items, list)
    try:
        values = [row.parse(str(item)) if row.parse else item for item in items]
    except ValueError:
        raise ConfigError(f"{row.option} {raw!r}: expected {row.type_name()}") from None
    return values if row.action == "list" else values[0]


def _auto_option(text: str) -> tuple[str, object]:
    """``--auto-balloon KEY=VALUE`` as the [auto_balloon] entry, typed by its row."""
    key, sep, raw = text.partition("=")
    row = _AUTO_BY_KEY.get(key)
    if not sep or row is None:
        known = ", ".join(_AUTO_BY_KEY)
        raise ConfigError(f"--auto-balloon {text!r}: expected KEY=VALUE with KEY one of {known}")
    if bool in row.types:
        if raw not in ("true", "false"):
            raise ConfigError(f"--auto-balloon {text!r}: {key} is true or false")
        return key, raw == "true"
    if float in row.types:
        try:
            return key, float(raw)
        except ValueError:
            raise ConfigError(f"--auto-balloon {text!r}: {key} is a number") from None
    return key, raw


# -- all of it together ----------------------------------------------------------------------
def load_settings(args: argparse.Namespace, activated: Mapping[str, str] | None = None) -> Settings:
    """The settings from the file ``args.config`` names (if any) and the options in
    ``args`` (an option wins), with a VM for each socket systemd passed under a name
    nobody configured (``activated``: name -> path; FileDescriptorName= in its unit)."""
    config = getattr(args, "config", None)
    where = f"--config {str(config)!r}"
    values = _checked_table(_read_file(config), SETTINGS, where, _given(args))
    vms = list(values["vms"])
    named = {vm.name for vm in vms}
    vms += [VmSpec(n, Path(p)) for n, p in (activated or {}).items() if n not in named]
    values["vms"] = tuple(replace(vm, discard=vm.discard and values["discard"]) for vm in vms)
    _check_vms(values["vms"])
    return Settings(**values)


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
