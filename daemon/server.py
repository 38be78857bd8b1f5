"""The daemon: one listening socket per VM, one connection per VM at a time.

Sockets are created before anything else starts, so a bad path fails at start-up
with a clear message rather than when QEMU first tries to connect. A stale socket
file left by a crashed daemon is replaced; one that a live process still listens on
is not. On shutdown (cancellation: SIGTERM/SIGINT in the CLI) every connection
finishes the report it has in hand, and the socket files this process created are
removed.

With a keeper (``fd_store``: systemd's fd store or ``vhost-user-balloon supervise``,
handover.py) a shutdown is a hand-over instead: the listening sockets and every
connection stay with the keeper, socket files stay in place, and the next process
takes them up from ``stored`` (``LISTEN_FDNAMES`` ``vub.*``) before it accepts
anything. QEMU sees nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import structlog
import trio

from vhost_user_balloon.protocol import DEFAULT_FEATURES, BalloonFeature, VhostUserError

from .autoballoon.runner import AutoBalloonRunner
from .config import DEFAULT_STATS_INTERVAL_S, Access, AutoBalloon, VmSpec
from .control import serve_control
from .handover.records import AdoptError, HandOver, take_up
from .handover.store import (
    DAEMON,
    TOTALS_SLOT_BYTES,
    FdStore,
    StateFile,
    StoredVm,
    VmKeeper,
    fd_name,
)
from .linux.fds import close_fds
from .linux.syscalls import peer_groups
from .linux.systemd import Notifier
from .observing.http import open_metrics_listeners, serve_metrics
from .observing.metrics import Metrics, VmMemoryStats
from .serving.connection import ConnectionOptions, VmConnection
from .serving.discard import DiscardPool
from .serving.passthrough import VFIO_MARKERS, PeerScans

__all__ = ["DISCARD_THREADS", "Daemon", "StartupError"]

log = structlog.get_logger()

#: Worker threads punching holes at once, across all VMs: the work is bound by memory
#: bandwidth, so more threads than cores would only queue inside the kernel.
DISCARD_THREADS: Final = max(2, os.cpu_count() or 2)
#: Pending connections per VM socket; QEMU connects once, anything else is refused.
_BACKLOG: Final = 4
#: Version of the saved metric totals.
_TOTALS_FORMAT: Final = 1
#: struct ucred: pid, uid, gid (socket(7) SO_PEERCRED)
_PEERCRED: Final = struct.Struct("=iII")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class _Listener:
    def __init__(self, vm: VmSpec, sock: socket.socket, *, owned: bool = True) -> None:
        self.vm = vm
        self.sock = trio.socket.from_stdlib_socket(sock)
        #: False for a socket systemd passed us: its file is systemd's to remove
        self.owned = owned
        st = os.stat(vm.socket)
        self.identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        self.sock.close()
        if not self.owned:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.vm.socket)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.vm.socket)


def _check_directory(label: str, path: Path) -> None:
    """Refuse a directory where another user could swap our socket for theirs (QEMU
    would then hand guest memory to whoever listens there)."""
    st = os.stat(path.parent)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise StartupError(
            f"{label}: directory {path.parent} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit, so anyone "
            "there could replace the socket; use a directory only the daemon can write, "
            "such as /run/vhost-user-balloon (0755)"
        )


def _bind(label: str, where: Path, access: Access) -> socket.socket:
    _check_directory(label, where)
    path = str(where)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise StartupError(
                f"{label}: {path} exists and is not a socket; move it away or choose another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a daemon that died
        except OSError as err:
            raise StartupError(f"{label}: cannot check {path}: {err.strerror}") from None
        else:
            raise StartupError(
                f"{label}: {path} is in use by a running process; "
                "is another vhost-user-balloon serving this VM?"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # never visible with wider permissions than 0600
    try:
        sock.bind(path)
        if access.socket_gid is not None:
            os.chown(path, -1, access.socket_gid)
        os.chmod(path, access.socket_mode)
        sock.listen(_BACKLOG)
    except OSError as err:
        sock.close()
        raise StartupError(f"{label}: cannot listen on {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def _supplementary_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    """The peer's supplementary groups (QEMU under libvirt: libvirt-qemu's primary group,
    kvm as a supplementary one). If the kernel will not say, only the primary counts."""
    try:
        return peer_groups(sock.fileno())
    except OSError as err:
        log.warning("peer_groups_unknown", error=str(err))
        return ()


def _adopt(vm: VmSpec, fd: int) -> socket.socket:
    """A listening socket systemd passed us for this VM (socket activation)."""
    sock = socket.socket(fileno=fd)
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        sock.detach()
        raise StartupError(
            f"VM {vm.name}: the socket systemd passed (fd {fd}) is not a "
            "listening unix stream socket; use ListenStream=/path in the "
            ".socket unit"
        )
    return sock


class Daemon:
    """Serves every configured VM until cancelled."""

    def __init__(
        self,
        vms: Sequence[VmSpec],
        *,
        metrics: Metrics | None = None,
        metrics_listen: tuple[str, int] | None = None,
        access: Access | None = None,
        stats_interval: float = DEFAULT_STATS_INTERVAL_S,
        deflate_on_oom: bool = False,
        control_socket: Path | None = None,
        inherited: Mapping[str, int] | None = None,
        notifier: Notifier | None = None,
        fd_store: bool = False,
        stored: Mapping[str, StoredVm] | None = None,
        auto_balloon: AutoBalloon | None = None,
        passthrough_markers: tuple[str, ...] = VFIO_MARKERS,
    ) -> None:
        self.vms = tuple(vms)
        #: looks at QEMU's open files for passthrough devices (tests name their markers)
        self.peer_scans = PeerScans(passthrough_markers)
        self.auto_balloon = auto_balloon
        self._auto: tuple[AutoBalloonRunner, trio.CancelScope] | None = None
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics_listen = metrics_listen
        self.metrics_address: tuple[str, int] | None = None
        self.access = access if access is not None else Access()
        self.stats_interval = stats_interval
        #: offer DEFLATE_ON_OOM: a guest short of memory takes pages back by itself
        self.features = DEFAULT_FEATURES | (BalloonFeature.DEFLATE_ON_OOM if deflate_on_oom else 0)
        self.control_socket = control_socket
        self._control: _Listener | None = None
        #: listening sockets passed by systemd, by VM name (socket activation)
        self.inherited = dict(inherited or {})
        self.notifier = notifier if notifier is not None else Notifier({})
        #: the keeper of our fds across restarts (disabled: a restart ends every link)
        self.store = FdStore(self.notifier, enabled=fd_store)
        #: what the keeper passed us from the process before, by VM name
        self.stored = dict(stored or {})
        #: where the metric totals are saved for the next process (with a keeper)
        self._totals: StateFile | None = None
        if self.stored and not self.store.enabled:
            log.warning(
                "stored_fds_without_keeper",
                vms=sorted(self.stored),
                message="fds from an earlier process were passed, but no fd store is in "
                "use now; those connections are closed",
            )
            for entry in self.stored.values():
                close_fds(entry.fds.values())
            self.stored.clear()
        self.connections: dict[str, VmConnection] = {}
        #: each VM's balloon target in bytes, kept across its connections
        self.targets: dict[str, int] = {}
        #: VMs whose target was set by hand: the automatic policy leaves them alone
        self.pins: set[str] = set()
        self._listeners: dict[str, tuple[_Listener, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self.discard_pool = DiscardPool(DISCARD_THREADS)
        for vm in self.vms:
            self.metrics.add_vm(vm.name)
        self.metrics.watch_memory(self.memory_snapshot)

    def memory_snapshot(self) -> dict[str, VmMemoryStats]:
        out = {}
        for vm in self.vms:
            conn = self.connections.get(vm.name)
            if conn is None:
                out[vm.name] = VmMemoryStats(0, 0)
            else:
                out[vm.name] = VmMemoryStats(conn.memory.ram_bytes, conn.memory.resident_bytes())
        return out

    def _open_listener(self, vm: VmSpec) -> _Listener:
        fd = self.inherited.pop(vm.name, None)
        if fd is not None:
            return _Listener(vm, _adopt(vm, fd), owned=False)
        entry = self.stored.get(vm.name)
        kept = entry.fds.pop(fd_name(vm.name, "listen"), None) if entry else None
        if kept is not None:
            sock = _adopt(vm, kept)
            if sock.getsockname() == str(vm.socket) and os.path.exists(vm.socket):
                return _Listener(vm, sock, owned=False)
            sock.close()  # the VM's socket path changed while we were away
            self.store.drop(fd_name(vm.name, "listen"))
        listener = _Listener(vm, _bind(f"VM {vm.name}", vm.socket, self.access))
        if self.store.enabled:
            # The next process listens on this very socket; the file stays on exit.
            self.store.put(fd_name(vm.name, "listen"), listener.sock.fileno())
            listener.owned = False
        return listener

    def _close_listener(self, listener: _Listener, *, for_good: bool) -> None:
        if for_good and self.store.enabled:
            self.store.drop(fd_name(listener.vm.name, "listen"))
            listener.owned = True
        listener.close()

    def _carry_totals(self) -> None:
        """Go on from the metric totals the process before us saved, and keep saving
        ours where the next process will find them."""
        entry = self.stored.pop(DAEMON, None)
        fd = entry.get("metrics") if entry is not None else None
        if fd is None:
            self._totals = StateFile.create("metrics", TOTALS_SLOT_BYTES)
            self.save_totals()  # a crash before the first scrape then finds zeros, not nothing
            self.store.put(fd_name(DAEMON, "metrics"), self._totals.fd)
            return
        self._totals = StateFile(fd, slot_bytes=TOTALS_SLOT_BYTES)
        record = self._totals.read()
        try:
            if record is None or record.get("format") != _TOTALS_FORMAT:
                raise ValueError("unreadable or from another version")
            series = self.metrics.restore_totals(record["totals"])
        except (ValueError, KeyError) as err:
            log.warning("metrics_not_carried_over", error=str(err),
                        message="counters start again from 0 (a counter reset)")  # fmt: skip
        else:
            log.info("metrics_carried_over", series=series)

    def save_totals(self) -> None:
        """Save the metric totals for the next process. Called just before every scrape,
        so that what Prometheus has seen is never more than what the next process starts
        from (a counter never goes down), and at a clean stop."""
        if self._totals is None:
            return
        try:
            totals = self.metrics.export_totals_json()
            self._totals.write_json(f'{{"format":{_TOTALS_FORMAT},"totals":{totals}}}')
        except (ValueError, OSError) as err:
            log.warning("metrics_not_saved", error=str(err))

    async def _adopt_connections(self) -> None:
        """Take up the connections the process before us served."""
        known = {vm.name for vm in self.vms}
        for name, entry in sorted(self.stored.items()):
            leftover = entry.fds.pop(fd_name(name, "listen"), None)
            if leftover is not None:  # a VM no longer configured
                close_fds([leftover])
                self.store.drop(fd_name(name, "listen"))
            if not entry.fds:
                continue
            if name not in known:
                log.warning(
                    "unconfigured_vm_adopted",
                    vm=name,
                    message="this VM is no longer configured, but its QEMU is still "
                    "attached; it is served until QEMU goes away",
                )
                self.metrics.add_vm(name)
            try:
                stored = take_up(entry, self.store)
                conn = VmConnection.adopt(stored, self.metrics, self._options(name), self.targets)
            except (AdoptError, VhostUserError, OSError) as err:
                log.error("adopt_failed", vm=name, error=str(err))
                continue
            self.connections[name] = conn
            self.metrics.adopted.labels(vm=name).inc()
            assert self._nursery is not None
            self._nursery.start_soon(self._serve, conn)
        self.stored.clear()

    def _options(self, name: str) -> ConnectionOptions:
        """How VM ``name``'s connection is served (a VM no longer configured: defaults)."""
        return ConnectionOptions(
            discard=next((vm.discard for vm in self.vms if vm.name == name), True),
            discard_pool=self.discard_pool,
            stats_interval=self.stats_interval,
            features=self.features,
            peer_scans=self.peer_scans,
        )

    def _handover(self, name: str) -> HandOver:
        """The hand-over of a new connection: with a keeper if there is one and it
        answers (if not, the VM is served all the same, without a hand-over)."""
        if not self.store.enabled:
            return HandOver(name, None)
        try:
            return HandOver(name, VmKeeper.start(self.store, name))
        except OSError as err:
            log.error("handover_disabled", vm=name, error=str(err),
                      message="the keeper did not take this VM's fds; it is served without "
                      "a hand-over across restarts")  # fmt: skip
            return HandOver(name, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            http = await self._open_all()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._control is not None:
                    control = trio.SocketListener(self._control.sock)
                    nursery.start_soon(serve_control, control, self._vm_connections, self.pins)
                if http:
                    nursery.start_soon(
                        serve_metrics, http, self.metrics.registry, self.save_totals,
                        self.metrics.lock,
                    )  # fmt: skip
                nursery.start_soon(self._watchdog)
                self._start_auto_balloon()
                await self._adopt_connections()
                for listener, scope in self._listeners.values():
                    nursery.start_soon(self._accept_loop, listener, scope)
                address = self.metrics_address
                log.info(
                    "daemon_ready",
                    vms=[vm.name for vm in self.vms],
                    sockets=[str(vm.socket) for vm in self.vms],
                    metrics=f"http://{address[0]}:{address[1]}/metrics" if address else None,
                )
                self.notifier.ready(self._status())
                task_status.started()
        finally:
            self._close_all()
            log.info("daemon_stopped")

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog at half its interval for as long as the event loop
        runs: a daemon whose loop is stuck stops pinging and systemd restarts it."""
        seconds = self.notifier.watchdog_seconds
        if seconds is None:
            return
        while True:
            self.notifier.notify("WATCHDOG=1")
            await trio.sleep(seconds / 2)

    @property
    def auto_runner(self) -> AutoBalloonRunner | None:
        """The automatic balloon policy's loop (None while it is off)."""
        return None if self._auto is None else self._auto[0]

    def _start_auto_balloon(self) -> None:
        if self.auto_balloon is None or self._nursery is None:
            return
        runner = AutoBalloonRunner(
            self.auto_balloon, self.metrics.registry, lambda: self.connections,
            lambda: {vm.name: vm for vm in self.vms}, self.pins,
        )  # fmt: skip
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await runner.run()

        self._auto = (runner, scope)
        self._nursery.start_soon(run)

    def _reconfigure_auto_balloon(self, settings: AutoBalloon | None) -> None:
        """SIGHUP: the policy turned on, off, or given new settings."""
        self.auto_balloon = settings
        if self._auto is not None and settings is not None:
            self._auto[0].reconfigure(settings)
        elif self._auto is not None:
            self._auto[1].cancel()
            self._auto = None
            log.info("auto_balloon_stopped")
        else:
            self._start_auto_balloon()

    async def _open_all(self) -> list[trio.SocketListener]:
        """Everything that can fail at start-up, before anything is served: the carried
        totals, every VM's socket, the metrics listeners (returned), the control socket."""
        if self.store.enabled:
            self._carry_totals()
        for vm in self.vms:
            self._listeners[vm.name] = (self._open_listener(vm), trio.CancelScope())
        http: list[trio.SocketListener] = []
        if self.metrics_listen is not None:
            host, port = self.metrics_listen
            try:
                http = await open_metrics_listeners(host, port)
            except OSError as err:
                raise StartupError(
                    f"cannot serve metrics on {host}:{port}: "
                    f"{err.strerror}; choose another --metrics-listen"
                ) from None
            bound = http[0].socket.getsockname()
            self.metrics_address = (bound[0], bound[1])
        if self.control_socket is not None:
            spec = VmSpec("control", self.control_socket)
            bound_control = _bind("control socket", self.control_socket, Access(socket_mode=0o600))
            self._control = _Listener(spec, bound_control)
        return http

    def _close_all(self) -> None:
        self.save_totals()
        if self._totals is not None:
            close_fds([self._totals.fd])
            self._totals = None
        self.notifier.stopping()
        for listener, _ in self._listeners.values():
            self._close_listener(listener, for_good=False)
        self._listeners.clear()
        for entry in self.stored.values():  # never adopted: startup failed
            close_fds(entry.fds.values())
        if self._control is not None:
            self._control.close()
            self._control = None

    def reload(
        self, vms: Sequence[VmSpec], access: Access, auto_balloon: AutoBalloon | None = None
    ) -> None:
        """Apply a new configuration (SIGHUP): add and remove VMs, leave the others alone.

        A removed VM stops listening; a QEMU still attached to it keeps its connection
        until it goes away (cutting it would abort QEMU 11.1). A VM whose socket cannot
        be opened is logged and left out; the rest still applies.
        """
        self._reconfigure_auto_balloon(auto_balloon)
        old = {vm.name: vm for vm in self.vms}
        new = {vm.name: vm for vm in vms}
        changed = [n for n in old.keys() & new.keys() if old[n].socket != new[n].socket]
        removed = sorted(old.keys() - new.keys()) + changed
        for name in old.keys() - new.keys():
            self.targets.pop(name, None)
            self.pins.discard(name)
        for name in removed:
            listener, scope = self._listeners.pop(name)
            scope.cancel()
            self._close_listener(listener, for_good=True)
        self.access = access
        kept: list[VmSpec] = []
        added, failed = [], []
        for vm in vms:
            conn = self.connections.get(vm.name)
            if conn is not None:
                conn.discard = vm.discard  # applies to the next report
            if vm.name in self._listeners:
                kept.append(vm)
                continue
            try:
                listener = self._open_listener(vm)
            except StartupError as err:
                failed.append(vm.name)
                log.error("vm_not_added", vm=vm.name, error=str(err))
                continue
            scope = trio.CancelScope()
            self._listeners[vm.name] = (listener, scope)
            assert self._nursery is not None
            self._nursery.start_soon(self._accept_loop, listener, scope)
            self.metrics.add_vm(vm.name)
            kept.append(vm)
            added.append(vm.name)
        self.vms = tuple(kept)
        log.info(
            "config_reloaded",
            added=sorted(added),
            removed=sorted(removed),
            failed=failed,
            still_attached=sorted(n for n in removed if n in self.connections),
        )
        self.notifier.status(self._status())

    def _vm_connections(self) -> dict[str, VmConnection | None]:
        return {vm.name: self.connections.get(vm.name) for vm in self.vms}

    def _status(self) -> str:
        return f"{len(self.connections)} of {len(self.vms)} VMs attached"

    async def _accept_loop(self, listener: _Listener, scope: trio.CancelScope) -> None:
        with scope:
            await self._accept(listener)

    async def _accept(self, listener: _Listener) -> None:
        vm = listener.vm
        while True:
            sock, _ = await listener.sock.accept()
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            groups = frozenset({gid, *_supplementary_groups(sock)})
            refusal = None
            if not self.access.allows(uid, groups):
                refusal = "peer_not_allowed"
            elif vm.name in self.connections:
                refusal = "vm_busy"
            if refusal is not None:
                log.warning(
                    "connection_refused",
                    vm=vm.name,
                    reason=refusal,
                    peer_pid=pid,
                    peer_uid=uid,
                    peer_gid=gid,
                    peer_groups=sorted(groups - {gid}),
                )
                self.metrics.connections_refused.labels(vm=vm.name, reason=refusal).inc()
                sock.close()
                continue
            conn = VmConnection(
                vm.name,
                sock,
                self.metrics,
                self._options(vm.name),
                handover=self._handover(vm.name),
                targets=self.targets,
            )
            self.connections[vm.name] = conn
            assert self._nursery is not None
            self._nursery.start_soon(self._serve, conn)

    async def _serve(self, conn: VmConnection) -> None:
        self.notifier.status(self._status())
        try:
            await conn.serve()
        finally:
            del self.connections[conn.vm]
            self.notifier.status(self._status())
