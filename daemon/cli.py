"""The ``vhost-user-balloon`` command: parse, check, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import structlog
import trio

from vhost_user_balloon import __version__

from .config import (
    DEFAULT_METRICS_LISTEN,
    DEFAULT_STATS_INTERVAL_S,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    Settings,
    config_keys_help,
    load_settings,
    parse_size,
)
from .handover.store import StoredVm, stored_vms
from .linux.logs import configure_logging
from .linux.systemd import Notifier, listen_fds
from .server import Daemon, StartupError
from .supervise import standby

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Serve the virtio-balloon device to QEMU over vhost-user. Guests report their free
memory through the free page reporting virtqueue; the daemon gives it back to the
host (fallocate PUNCH_HOLE on the guest RAM file) and exports per-VM, per-order
counters for Prometheus. One daemon serves many VMs, one socket each.
"""

EPILOG = """\
attach a VM (QEMU >= 10.2; guest RAM must be a shared memfd or hugetlbfs file):
  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=2G,share=on \\
    -machine q35,memory-backend=mem \\
    -chardev socket,id=vb,path=/run/vhost-user-balloon/web1.sock \\
    -device vhost-user-test-device-pci,chardev=vb,virtio-id=5,num_vqs=5,config_size=16

config_size=16 is required: without it the guest inflates the balloon over all its
memory, and the daemon refuses the connection.

status: "vhost-user-balloon status [--metrics-listen HOST:PORT]" prints a per-VM table
(attached or waiting, features, RAM, resident, given back, balloon target and the
automatic policy's reason, reported by order) from a running daemon's /metrics.

signals: SIGHUP re-reads the configuration: VMs added are served, VMs removed stop
listening (a QEMU still attached keeps its connection), the others are not touched.
SIGTERM and SIGINT finish the reports in hand, close the sockets and
remove the socket files (with a keeper, below: hand everything over instead).

live migration: "vhost-user-balloon migrate-prepare --qmp PATH" on the source before,
"migrate-finish --qmp PATH --socket SOCKET [--bus ID]" on the destination after, then
"reclaim VM --control-socket PATH" (each has --help).

restarts without QEMU noticing: run under a keeper that holds the daemon's fds
while it restarts, and every attached VM is taken up again by the next process:
  vhost-user-balloon supervise [daemon options]   (restarts it after a crash, in
      ~20 ms: the next daemon waits ready; SIGUSR2 to the supervisor restarts it on
      purpose, e.g. after an upgrade)
  systemd: the unit in systemd/ runs supervise with the fd store as well
      (Type=notify, FileDescriptorStoreMax=4096, --fd-store).
exit status: 0 after a clean stop, 1 if the daemon cannot
start (the message says why), 2 for bad options.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhost-user-balloon", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--vm", action="append", default=[], metavar="NAME=SOCKET_PATH",
        help="serve a VM: NAME is its metric label, SOCKET_PATH the unix socket the "
        "daemon listens on and QEMU's -chardev socket connects to (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--config", type=Path, metavar="FILE",
        help="TOML file with these keys (command-line options override them): "
        + config_keys_help(),
    )  # fmt: skip
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT",
        help=f"where to serve /metrics for Prometheus (default {DEFAULT_METRICS_LISTEN}; "
        "'none' to disable; [::1]:PORT for IPv6)",
    )  # fmt: skip
    p.add_argument(
        "--log-format", choices=LOG_FORMATS,
        help="log lines as JSON or for people (default auto: JSON unless stdout is a "
        "terminal)",
    )  # fmt: skip
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="least severe level logged (default info; debug logs every report)",
    )
    p.add_argument(
        "--socket-mode", metavar="OCTAL",
        help="permissions of the VM sockets (default 0600: only the daemon's user; QEMU "
        "must run as that user or be given access)",
    )  # fmt: skip
    p.add_argument(
        "--socket-group", metavar="GROUP",
        help="group of the VM sockets, e.g. kvm or libvirt-qemu (with --socket-mode 0660)",
    )  # fmt: skip
    p.add_argument(
        "--allow-user", action="append", default=[], metavar="USER",
        help="accept connections only from processes of this user (name or uid; "
        "repeatable; checked with SO_PEERCRED). Without --allow-user/--allow-group, "
        "the socket permissions decide",
    )  # fmt: skip
    p.add_argument(
        "--allow-group", action="append", default=[], metavar="GROUP",
        help="accept connections from processes that have this group, as their primary "
        "or a supplementary group (name or gid; repeatable); e.g. kvm for QEMU under libvirt",
    )  # fmt: skip
    p.add_argument(
        "--no-discard", action="store_true",
        help="complete and count reports but never free guest memory: for guest memory "
        "pinned in ways the daemon cannot see (a VFIO device in QEMU is noticed by "
        "itself, from QEMU's open files)",
    )  # fmt: skip
    p.add_argument(
        "--stats-interval", type=float, metavar="SECONDS",
        help="how often to ask guests for fresh memory statistics, exported as "
        f"vhost_user_balloon_guest_* metrics (default {DEFAULT_STATS_INTERVAL_S:g}; 0 keeps "
        "the first numbers)",
    )  # fmt: skip
    p.add_argument(
        "--deflate-on-oom", action="store_true",
        help="offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: a guest about to run out of memory "
        "takes pages back from the balloon by itself (its MemTotal then does not shrink "
        "when the balloon grows)",
    )  # fmt: skip
    p.add_argument(
        "--fd-store", action="store_true",
        help="hand every VM's connection to the service manager's file descriptor "
        "store (sd_notify FDSTORE=1), so that a restarted daemon takes it up again "
        "(the unit needs FileDescriptorStoreMax=, or systemd ignores the fds); on by "
        "itself when $FDSTORE is set (systemd >= 254, vhost-user-balloon supervise)",
    )  # fmt: skip
    p.add_argument(
        "--control-socket", metavar="PATH",
        help="serve the balloon control socket here (mode 0600): "
        "'vhost-user-balloon balloon VM SIZE' sets how much memory a guest gives up",
    )  # fmt: skip
    p.add_argument(
        "--auto-balloon-budget", metavar="SIZE", type=parse_size,
        help="turn on the automatic balloon policy: hold the guests' host-resident RAM, "
        "summed, under SIZE (e.g. 6G); its other settings: [auto_balloon] in --config",
    )  # fmt: skip
    p.add_argument(
        "--auto-balloon", metavar="KEY=VALUE", action="append", default=[],
        help="any [auto_balloon] setting (repeatable), e.g. step=256M or interval=5",
    )  # fmt: skip
    p.add_argument(
        "--auto-balloon-observe-only", action="store_true",
        help="the policy logs and counts its decisions but applies none",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def settings_from_args(args: argparse.Namespace, activated: Mapping[str, str]) -> Settings:
    """Settings from the command line, the config file it names, and the sockets systemd
    passed (name -> path)."""
    return load_settings(
        activated=activated,
        vm_args=args.vm,
        config_file=args.config,
        metrics_listen=args.metrics_listen,
        log_format=args.log_format,
        log_level=args.log_level,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        allow_users=args.allow_user,
        allow_groups=args.allow_group,
        no_discard=args.no_discard,
        stats_interval=args.stats_interval,
        deflate_on_oom=args.deflate_on_oom,
        control_socket=args.control_socket,
        auto_budget=args.auto_balloon_budget,
        auto_observe_only=args.auto_balloon_observe_only,
        auto_options=args.auto_balloon,
    )


def _socket_path(fd: int) -> str:
    with socket.socket(fileno=fd) as sock:
        try:
            return str(sock.getsockname())
        finally:
            sock.detach()


async def run(
    settings: Settings,
    activated: Mapping[str, int],
    reread: Callable[[], Settings],
    *,
    fd_store: bool = False,
    stored: Mapping[str, StoredVm] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP re-reads the configuration."""
    daemon = Daemon(
        settings.vms,
        metrics_listen=settings.metrics_listen,
        access=settings.access,
        stats_interval=settings.stats_interval,
        deflate_on_oom=settings.deflate_on_oom,
        control_socket=settings.control_socket,
        inherited=activated,
        notifier=Notifier(),
        fd_store=fd_store,
        stored=stored,
        auto_balloon=settings.auto_balloon,
    )
    log = structlog.get_logger()
    # Outside the receiver below (before it opens, and once it has closed and put this
    # handler back) a stop signal is only noted: one that came early stops the daemon
    # as soon as it is up; one that comes late is a stop's second SIGTERM (systemd's
    # and the supervisor's both reach this process) and must not turn a clean stop
    # into death by signal while the interpreter winds down.
    early: list[int] = []
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda number, _frame: early.append(number))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if early:
                log.info("shutdown_requested", signal=signal.Signals(early[0]).name)
                nursery.cancel_scope.cancel()
                return
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        new = reread()
                    except ConfigError as err:
                        log.error(
                            "reload_failed",
                            error=str(err),
                            message="the configuration in use is unchanged",
                        )
                        continue
                    if new.metrics_listen != settings.metrics_listen:
                        log.warning(
                            "reload_partial", message="metrics_listen changes need a restart"
                        )
                    daemon.reload(new.vms, new.access, new.auto_balloon)
                    continue
                log.info("shutdown_requested", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    waiting = os.environ.pop(standby.ENV, None)
    if waiting is None:
        activated = listen_fds()
    else:  # started ahead of need by supervise: wait to be handed the connections
        try:
            given = standby.wait_for_fds(int(waiting))
        except KeyboardInterrupt:  # a terminal's ^C reaches the standby too
            return 130
        if given is None:
            return 0  # the keeper went away first
        activated = given
    stored = stored_vms(activated)  # our own fds from the process before us
    fd_store = args.fd_store or os.environ.get("FDSTORE", "0").strip() not in ("", "0")
    paths = {name: _socket_path(fd) for name, fd in activated.items()}
    try:
        settings = settings_from_args(args, paths)
    except ConfigError as err:
        parser.error(str(err))
    configure_logging(settings.log_format, settings.log_level)  # type: ignore[arg-type]
    try:
        trio.run(
            partial(run, fd_store=fd_store, stored=stored),
            settings,
            activated,
            lambda: settings_from_args(args, paths),
        )
        # Stopped: from here on a SIGTERM is ignored, also while the interpreter winds
        # down (which puts handlers written in Python back to the default).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except BaseExceptionGroup as group:
        startup, rest = group.split(StartupError)
        if startup is None or rest is not None:
            raise
        for problem in startup.exceptions:
            print(f"vhost-user-balloon: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
