"""The ``vhost-user-balloon`` command: parse, check, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import structlog
import trio

from vhost_user_balloon import __version__
from vhost_user_balloon.protocol import qemu_device_option

from .config import ConfigError, Settings, add_options, keys_help, load_settings
from .handover.store import kept_vms
from .linux.logs import configure_logging
from .linux.systemd import Notifier, listen_fds
from .server import Daemon, Inherited, StartupError
from .supervise import standby

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Serve the virtio-balloon device to QEMU over vhost-user. Guests report their free
memory through the free page reporting virtqueue; the daemon gives it back to the
host (fallocate PUNCH_HOLE on the guest RAM file) and exports per-VM, per-order
counters for Prometheus. One daemon serves many VMs, one socket each.
"""

EPILOG = f"""\
attach a VM (QEMU >= 10.2; guest RAM must be a shared memfd or hugetlbfs file):
  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=2G,share=on \\
    -machine q35,memory-backend=mem \\
    -chardev socket,id=vb,path=/run/vhost-user-balloon/web1.sock \\
    -device {qemu_device_option(chardev="vb")}

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
while it restarts, and every attached VM is adopted by the next process:
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
        prog="vhost-user-balloon", description=DESCRIPTION,
        epilog=f"{EPILOG}\nconfiguration file keys (--config):\n{keys_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_options(p)
    # How this process is run, not settings of the file:
    p.add_argument(
        "--config", type=Path, metavar="FILE",
        help="TOML file with the keys listed below (the options above override them)",
    )  # fmt: skip
    p.add_argument(
        "--fd-store", action="store_true",
        help="hand every VM's connection to the service manager's file descriptor "
        "store (sd_notify FDSTORE=1), so that a restarted daemon adopts it (the unit "
        "needs FileDescriptorStoreMax=, or systemd ignores the fds); on by itself when "
        "$FDSTORE is set (systemd >= 254, vhost-user-balloon supervise)",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _socket_path(fd: int) -> str:
    with socket.socket(fileno=fd) as sock:
        try:
            return str(sock.getsockname())
        finally:
            sock.detach()


def _handed_fds() -> dict[str, int] | None:
    """The fds this process starts with, by name: what systemd or supervise passed
    (LISTEN_FDS), or, for a standby, what the keeper hands it once the daemon before
    is gone (None: the keeper went away first)."""
    waiting = os.environ.pop(standby.ENV, None)
    if waiting is None:
        return listen_fds()
    return standby.wait_for_fds(int(waiting))


async def serve(
    daemon: Daemon, reread: Callable[[], Settings], log: structlog.typing.FilteringBoundLogger
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP re-reads the configuration."""
    # Outside the receiver below (before it opens, and once it has closed and put this
    # handler back) a stop signal is only noted: one that came early stops the daemon
    # as soon as it is up; one that comes late is a stop's second SIGTERM (systemd's
    # and the supervisor's both reach this process) and must not turn a clean stop
    # into death by signal while the interpreter winds down.
    early: list[int] = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda number, _frame: early.append(number))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            stop = early[0] if early else await _until_stop(signals, daemon, reread, log)
            log.info("shutdown_requested", signal=signal.Signals(stop).name)
            nursery.cancel_scope.cancel()


async def _until_stop(
    signals: AsyncIterator[int],
    daemon: Daemon,
    reread: Callable[[], Settings],
    log: structlog.typing.FilteringBoundLogger,
) -> int:
    """Reload the configuration on every SIGHUP; the first other signal."""
    async for signum in signals:
        if signum != signal.SIGHUP:
            return signum
        _reload(daemon, reread, log)
    raise RuntimeError("the signal receiver ended")  # it never does


def _reload(
    daemon: Daemon, reread: Callable[[], Settings], log: structlog.typing.FilteringBoundLogger
) -> None:
    try:
        new = reread()
    except ConfigError as err:
        log.error("reload_failed", error=str(err), message="the configuration in use is unchanged")
        return
    if new.metrics_listen != daemon.settings.metrics_listen:
        log.warning("reload_partial", message="metrics_listen changes need a restart")
    daemon.reload(new)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handed = _handed_fds()
    except KeyboardInterrupt:  # a terminal's ^C reaches a waiting standby too
        return 130
    if handed is None:
        return 0  # a standby whose keeper went away first
    kept = kept_vms(handed)  # our own fds from the process before us
    fd_store = args.fd_store or os.environ.get("FDSTORE", "0").strip() not in ("", "0")
    paths = {name: _socket_path(fd) for name, fd in handed.items()}
    try:
        settings = load_settings(args, paths)
    except ConfigError as err:
        parser.error(str(err))
    configure_logging(settings.log_format, settings.log_level)  # type: ignore[arg-type]
    inherited = Inherited(handed, kept, fd_store, Notifier())
    daemon = Daemon(settings, inherited=inherited)
    try:
        trio.run(serve, daemon, lambda: load_settings(args, paths), structlog.get_logger())
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
