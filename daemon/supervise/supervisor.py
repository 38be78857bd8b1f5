"""``vhost-user-balloon supervise``: keep VM connections alive while the daemon restarts.

Theory of operation. The supervisor is the smallest possible service manager: it
starts the daemon as its child with ``$NOTIFY_SOCKET`` pointing at itself and
``$FDSTORE`` set, and implements the part of sd_notify that the daemon uses to hand
fds over: ``FDSTORE=1`` + ``FDNAME=`` (keep this fd under this name),
``FDSTOREREMOVE=1`` + ``FDNAME=`` (let go of every fd of that name), ``READY=1``.
When the child exits, for any reason, kill -9 included, the supervisor starts a new
one and passes every kept fd to it the way systemd does (fds 3.. with
``$LISTEN_FDS``, ``$LISTEN_PID``, ``$LISTEN_FDNAMES``). Because the supervisor holds
a copy of each connection, QEMU never sees a hang-up.

Under systemd (the shipped unit runs ``supervise``) the supervisor is the service's
main process and passes on to systemd what it must know: each fd stored (so that
the fds outlive the supervisor too) and removed, the first READY, STATUS, the
daemon's watchdog pings; the fds systemd passes at start (its store, the VMs' socket
units) are kept like stored ones.

It does no vhost-user work and imports nothing of the daemon but its logging, fd,
sd_notify and standby helpers, so there is little in it to crash or to upgrade.
Datagrams from the child are all read before its exit is handled, so an fd stored
just before a crash is not lost (systemd orders the two the same way).

A restart costs little because the next daemon is already running: once the child
is ready the supervisor starts a *standby* (the same command, waiting with
everything imported; see ``standby.py``) and, when the child exits, hands the kept
fds to it instead of starting a new interpreter. A standby that dies is started
again later, with a growing pause; without one the supervisor starts the next
daemon from scratch, as before.

Signals: SIGTERM/SIGINT stop the child and then the supervisor (the fds are closed:
QEMU sees the daemon go), SIGHUP is passed on (re-read the configuration), SIGUSR2
restarts the child on purpose (to run newly installed code: an upgrade). For that
the standby is replaced first, since it may run the code installed before, and the
child is stopped once the new standby is armed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from ..linux.fds import close_fds, take_fds
from ..linux.logs import configure_logging
from ..linux.peer import CREDENTIALS_SPACE, sender_credentials
from ..linux.systemd import Notifier, listen_fds
from . import standby

__all__ = ["Supervisor", "main"]

log = structlog.get_logger()

#: Most fds kept at once (systemd's FileDescriptorStoreMax=); about 20 per VM.
DEFAULT_STORE_MAX: Final = 4096
#: A child that exits sooner than this after it started counts as failing to start.
_STARTUP_GRACE_S: Final = 5.0
_BACKOFF_MAX_S: Final = 30.0
#: A standby starts this long after the child is ready (it takes a CPU for ~0.3 s,
#: better not while the child is still taking its VMs up).
_STANDBY_DELAY_S: Final = 1.0
#: After a standby died, the next one starts after 5 s, 10 s, ... up to this.
_STANDBY_BACKOFF_MAX_S: Final = 300.0
#: A planned restart waits this long at most for the fresh standby to be armed.
_STANDBY_ARM_TIMEOUT_S: Final = 30.0
#: Seconds the keeper waits to hand fds to a standby that does not read them.
_HANDOFF_TIMEOUT_S: Final = 5.0
_ANCBUF: Final = socket.CMSG_SPACE(253 * 4) + CREDENTIALS_SPACE

USAGE = """\
usage: vhost-user-balloon supervise [--no-standby] [DAEMON OPTIONS]

Run the daemon (vhost-user-balloon DAEMON OPTIONS) as a child process and keep a
copy of every VM connection it hands over, so that when it dies or is restarted the
next process takes each VM up again and QEMU notices nothing. The child is restarted
whenever it exits (after a crash, at once the first time, then with a growing pause
if it keeps failing to start). If the first daemon cannot start at all (bad options,
a socket in use), the supervisor exits with the daemon's exit status.

The next daemon is started ahead of time and waits, everything imported (a
standby, ~36 MiB), so that a restart takes milliseconds rather than the ~0.3 s a
new interpreter needs. --no-standby: start each daemon only when it is needed.

signals to the supervisor:
  SIGUSR2          restart the daemon on purpose, e.g. after installing a new version
                   (a new standby is started first, so the new version takes over)
  SIGHUP           passed to the daemon: re-read the configuration
  SIGTERM, SIGINT  stop the daemon and the supervisor; attached QEMUs see it go

Daemon options: vhost-user-balloon --help. Under systemd, use the service's file
descriptor store instead (systemd/vhost-user-balloon.service).
"""


@dataclass
class _Standby:
    """A daemon process waiting to be handed the fds (``standby.wait_for_fds``)."""

    pid: int
    sock: socket.socket
    armed: bool = False


class Supervisor:
    """Runs ``command`` as a child, keeps the fds it stores, restarts it."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        store_max: int = DEFAULT_STORE_MAX,
        use_standby: bool = True,
        upstream: Notifier | None = None,
        inherited: Mapping[str, int] | None = None,
    ) -> None:
        self.command = list(command)
        self.store_max = store_max
        self.use_standby = use_standby
        self.upstream = upstream
        self.told_ready = False  # the upstream manager was told READY=1
        self.standby: _Standby | None = None
        self.standby_due: float | None = None  # when to start the next standby
        self.standby_failures = 0
        self.retired: list[int] = []  # standbys told to go, not reaped yet
        self.restart_at: float | None = None  # a planned restart waits for a standby
        #: The fds kept, by name; at first what the manager above us passed (under
        #: systemd: its fd store and the VMs' socket units), which is kept as it is.
        self.kept: list[tuple[str, int]] = list((inherited or {}).items())
        self.child: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.failures = 0
        self.stopping = False
        self.restart_wanted = False
        self.exit_status = 0
        self._dir = Path(tempfile.mkdtemp(prefix="vhost-user-balloon-supervise-"))
        self.notify_path = self._dir / "notify"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(str(self.notify_path))
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()

    # -- main loop -------------------------------------------------------------------
    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_w)
        pending: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2,
                       signal.SIGCHLD):  # fmt: skip
            signal.signal(signum, lambda n, _f: pending.append(n))
        self._selector.register(self._notify, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        next_start: float | None = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self.child is None and next_start is not None and now >= next_start:
                    self._start_next()
                    next_start = None
                standby_at = self._standby_at()
                if standby_at is not None and now >= standby_at:
                    self._spawn_standby()
                    standby_at = None
                due = [t for t in (next_start, standby_at, self.restart_at) if t is not None]
                self._selector.select(max(0, min(due) - now) if due else None)
                self._drain_wakeups()
                self._read_notifications()  # always before a child's exit is handled
                self._read_standby()
                signals: list[int] = list(pending)
                pending.clear()
                for number in signals:
                    self._on_signal(number)
                self._reap_standbys()
                self._planned_restart()
                if self.child is not None:
                    status = self._reap()
                    if status is not None:
                        self.restart_at = None  # a planned restart is over either way
                        if self.stopping:  # stopped by the SIGTERM we sent: clean
                            self.exit_status = 0 if status in (0, -signal.SIGTERM) else 1
                            return self.exit_status
                        next_start = self._after_exit(status)
                        if next_start is None:
                            return self.exit_status
                elif self.stopping:
                    return 0
        finally:
            self._close()

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("supervisor_stopping", signal=signal.Signals(signum).name)
            if self.upstream is not None:
                self.upstream.stopping()
            self.stopping, self.restart_at = True, None
            self._retire_standby()
            self._kill(signal.SIGTERM)
        elif signum == signal.SIGHUP:
            self._kill(signal.SIGHUP)
        elif signum == signal.SIGUSR2:
            log.info("daemon_restart_requested", pid=self.child)
            self.restart_wanted = True
            if self.use_standby and self.child is not None:
                # The standby may run the code installed before: start a new one and
                # stop the child once it is armed (_planned_restart).
                self._retire_standby()
                self._spawn_standby()
                self.restart_at = time.monotonic() + _STANDBY_ARM_TIMEOUT_S
            else:
                self._kill(signal.SIGTERM)

    def _kill(self, signum: int) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    # -- the child --------------------------------------------------------------------
    def _start_next(self) -> None:
        """The next daemon: the standby if there is one (armed or still importing:
        the fds wait in its socket), else a new process."""
        waiting, self.standby = self.standby, None
        if waiting is not None:
            self._drop(waiting)
            try:
                waiting.sock.settimeout(_HANDOFF_TIMEOUT_S)
                standby.hand_fds(waiting.sock, self.kept)
            except OSError as err:
                log.warning("standby_lost", pid=waiting.pid, error=str(err))
                self._retire(waiting.pid)
            else:
                self.child, self.ready, self.started_at = waiting.pid, False, time.monotonic()
                log.info("daemon_started", pid=waiting.pid, fds_passed=len(self.kept), standby=True)
                return
            finally:
                waiting.sock.close()
        self._spawn()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(NOTIFY_SOCKET=str(self.notify_path), FDSTORE=str(self.store_max))
        # Under systemd's watchdog the daemon pings (us, and we pass it on): it is the
        # daemon's event loop that must be seen alive.
        env.pop("WATCHDOG_PID", None)
        return env

    def _spawn(self) -> None:
        names = [name for name, _ in self.kept]
        fds = [fd for _, fd in self.kept]
        env = self._env()
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))

        def pass_fds() -> None:
            # Move the kept fds to 3, 4, ... (above them first: they may overlap).
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)
                os.close(fd)
            if fds:
                env["LISTEN_PID"] = str(os.getpid())

        pid = self._fork_exec(env, pass_fds)
        self.child, self.ready, self.started_at = pid, False, time.monotonic()
        log.info("daemon_started", pid=pid, fds_passed=len(fds))

    def _fork_exec(self, env: dict[str, str], prepare: Callable[[], None]) -> int:
        """Start the daemon command; ``prepare`` runs in the child just before exec."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child runs until exec
            try:
                signal.set_wakeup_fd(-1)
                prepare()
                os.execve(self.command[0], self.command, env)
            finally:
                os._exit(127)
        return pid

    # -- the standby ------------------------------------------------------------------
    def _standby_at(self) -> float | None:
        """When to start a standby; ``None``: not now (there is one, or the daemon is
        not ready: then the time is not even waited for)."""
        wanted = self.use_standby and self.standby is None and self.ready and not self.stopping
        return self.standby_due if wanted else None

    def _spawn_standby(self) -> None:
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        env = self._env()
        env[standby.ENV] = str(theirs.fileno())
        pid = self._fork_exec(env, lambda: os.set_inheritable(theirs.fileno(), True))
        theirs.close()
        ours.setblocking(False)
        self.standby, self.standby_due = _Standby(pid, ours), None
        self._selector.register(ours, selectors.EVENT_READ)
        log.info("standby_started", pid=pid)

    def _read_standby(self) -> None:
        waiting = self.standby
        if waiting is None or waiting.armed:
            return
        try:
            data = waiting.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data == standby.ARMED:
            waiting.armed, self.standby_failures = True, 0
            log.info("standby_armed", pid=waiting.pid)
        else:  # it closed its end: it is gone, or going
            self._reap_standbys(why="closed its socket" if not data else f"sent {data[:20]!r}")

    def _reap_standbys(self, why: str | None = None) -> None:
        """Reap standbys that were told to go, and the current one if it is gone (or,
        with ``why``, take it as gone: it is told to go, and started again later)."""
        self.retired = [pid for pid in self.retired if _exit_code(pid) is None]
        waiting = self.standby
        if waiting is None:
            return
        code = _exit_code(waiting.pid)
        if code is not None:
            why = _how(code)
        elif why is None:
            return
        self.standby = None
        self._drop(waiting)
        waiting.sock.close()
        if code is None:
            self._retire(waiting.pid)
        self.standby_failures += 1
        delay = min(_STANDBY_BACKOFF_MAX_S, 5.0 * 2 ** (self.standby_failures - 1))
        self.standby_due = time.monotonic() + delay
        log.warning("standby_exited", pid=waiting.pid, how=why, next_in_s=delay)

    def _retire_standby(self) -> None:
        waiting, self.standby = self.standby, None
        if waiting is not None:
            self._drop(waiting)
            waiting.sock.close()
            self._retire(waiting.pid)

    def _drop(self, waiting: _Standby) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(waiting.sock)

    def _retire(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        self.retired.append(pid)

    def _planned_restart(self) -> None:
        """Stop the child for a planned restart once its successor is armed (or there
        is none after all: it died, or took too long)."""
        if self.restart_at is None:
            return
        waiting = self.standby
        if waiting is None or waiting.armed or time.monotonic() >= self.restart_at:
            self.restart_at = None
            self._kill(signal.SIGTERM)

    def _reap(self) -> int | None:
        assert self.child is not None
        code = _exit_code(self.child)
        if code is not None:
            self.child = None
        return code

    def _after_exit(self, code: int) -> float | None:
        """When to start the next child; ``None``: give up (nothing kept, never ready)."""
        died = _how(code)
        if self.restart_wanted:
            self.restart_wanted, self.failures = False, 0
            log.info("daemon_restarting", how=died, fds_kept=len(self.kept))
            return time.monotonic()
        quick = time.monotonic() - self.started_at < _STARTUP_GRACE_S
        if not self.ready and not self.kept:
            log.error("daemon_failed_to_start", how=died)
            self.exit_status = code if code > 0 else 1
            return None
        self.failures = self.failures + 1 if (quick or not self.ready) else 0
        delay = 0.0 if self.failures <= 1 else min(_BACKOFF_MAX_S, 0.5 * 2**self.failures)
        log.warning(
            "daemon_exited", how=died, restart_in_s=delay, fds_kept=len(self.kept),
            failures=self.failures,
        )  # fmt: skip
        return time.monotonic() + delay

    # -- sd_notify --------------------------------------------------------------------
    def _read_notifications(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self._notify.recvmsg(
                    4096, _ANCBUF, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return
            fds = take_fds(ancdata)
            sender = sender_credentials(ancdata)
            pid = None if sender is None else sender.pid
            if pid is None or pid != self.child:
                log.warning("notification_ignored", sender_pid=pid, why="not the daemon")
                close_fds(fds)
                continue
            self._apply(data.decode(errors="replace"), fds)

    def _apply(self, text: str, fds: list[int]) -> None:
        fields = dict(line.partition("=")[::2] for line in text.split("\n") if line)
        name = fields.get("FDNAME", "stored")
        stored: list[int] = []
        if fields.get("FDSTORE") == "1":
            for fd in fds:
                if len(self.kept) >= self.store_max:
                    log.error("fd_store_full", max=self.store_max, name=name)
                    close_fds([fd])
                    continue
                self.kept.append((name, fd))
                stored.append(fd)
            fds = []
        removed = fields.get("FDSTOREREMOVE") == "1"
        if removed:
            gone = [fd for n, fd in self.kept if n == name]
            self.kept = [(n, fd) for n, fd in self.kept if n != name]
            close_fds(gone)
        first_ready = False
        if fields.get("READY") == "1" and not self.ready:
            self.ready, self.failures = True, 0
            first_ready, self.told_ready = not self.told_ready, True
            if self.standby is None and self.standby_due is None:
                self.standby_due = time.monotonic() + _STANDBY_DELAY_S
            log.info("daemon_reported_ready", pid=self.child, fds_kept=len(self.kept))
        close_fds(fds)
        if self.upstream is not None:
            self._forward(fields, stored, removed=removed, ready=first_ready)

    def _forward(
        self, fields: dict[str, str], stored: list[int], *, removed: bool, ready: bool
    ) -> None:
        """Tell the service manager above us (systemd) what it needs of a message: the
        fds to store (so that they outlive the supervisor too), removals, the first
        READY, STATUS and watchdog pings. A daemon's STOPPING is not passed on: the
        service is not stopping when its daemon is restarted."""
        assert self.upstream is not None
        name = fields.get("FDNAME", "stored")
        if stored:
            try:
                self.upstream.store(name, stored)
            except OSError as err:
                log.error("fd_store_forward_failed", name=name, error=str(err))
        lines = ["READY=1"] if ready else []
        lines += [f"{key}={fields[key]}" for key in ("STATUS", "WATCHDOG") if key in fields]
        if removed:
            lines += ["FDSTOREREMOVE=1", f"FDNAME={name}"]
        if lines:
            self.upstream.notify(*lines)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _close(self) -> None:
        self._retire_standby()
        for pid in self.retired:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        close_fds(fd for _, fd in self.kept)
        self.kept.clear()
        self._notify.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    use_standby = "--no-standby" not in argv
    argv = [a for a in argv if a != "--no-standby"]
    fmt = "json" if _option(argv, "--log-format") == "json" else "console"
    configure_logging(fmt, "info")  # type: ignore[arg-type]
    structlog.contextvars.bind_contextvars(process="supervisor")
    command = daemon_command(argv)
    # Under systemd: what it passed (its fd store, socket units) and where to tell it.
    inherited = listen_fds()
    upstream = Notifier()
    store = os.environ.get("FDSTORE", "")
    return Supervisor(
        command,
        store_max=int(store) if store.isdigit() and int(store) > 0 else DEFAULT_STORE_MAX,
        use_standby=use_standby,
        upstream=upstream if upstream.enabled else None,
        inherited=inherited,
    ).run()


def _exit_code(pid: int) -> int | None:
    """A child's exit code once it has exited (and is now reaped), else ``None``."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # reaped already
        return 0
    return None if done == 0 else os.waitstatus_to_exitcode(status)


def _how(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def daemon_command(argv: Sequence[str]) -> list[str]:
    """How the daemon is started: by this interpreter, with ``-P`` so that the working
    directory is not put on ``sys.path``. (A root daemon must never import code from
    wherever it was started: from a source checkout, ``-m`` alone would import the
    checkout's half-built package instead of the installed one.)"""
    return [sys.executable, "-P", "-m", "vhost_user_balloon", *argv]


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
