"""The daemon: one listening socket per VM, one connection per VM at a time.

Everything that can fail at start-up (sockets, the metrics port, the control socket)
is opened before anything is served (listening.py). On shutdown (cancellation:
SIGTERM/SIGINT in the CLI) every connection finishes the report it has in hand, and
the socket files this process created are removed.

With a keeper (``Inherited.fd_store``: systemd's fd store or ``vhost-user-balloon
supervise``) a shutdown is a hand-over instead: the listening sockets and every
connection stay with the keeper, socket files stay in place, and the next process
adopts them (``Inherited.kept``) before it accepts anything. QEMU sees nothing. The
metric totals go on the same way: saved before every scrape into a state file the
keeper holds, and read back by the next process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import structlog
import trio

from vhost_user_balloon.protocol import DEFAULT_FEATURES, BalloonFeature, VhostUserError

from .autoballoon.runner import AutoBalloonRunner
from .config import AutoBalloon, Settings, SocketAccess, VmSpec
from .control import serve_control
from .handover.records import AdoptError, HandOver, check_kept
from .handover.store import DAEMON, TOTALS_SLOT_BYTES, KeptVm, StateFile, VmKeeper, fd_name
from .linux.fds import close_fds
from .linux.peer import peer_credentials
from .linux.syscalls import peer_groups
from .linux.systemd import FdStore, Notifier
from .listening import Listener, StartupError, bind, inherited_listener
from .observing.http import open_metrics_listeners, serve_metrics
from .observing.metrics import Metrics, VmMemoryStats
from .serving.connection import ConnectionOptions, VmConnection
from .serving.discard import DiscardPool
from .serving.passthrough import VFIO_MARKERS, PeerScans

__all__ = ["DISCARD_THREADS", "Daemon", "Inherited", "StartupError"]

log = structlog.get_logger()

#: Worker threads punching holes at once, across all VMs: the work is bound by memory
#: bandwidth, so more threads than cores would only queue inside the kernel.
DISCARD_THREADS: Final = max(2, os.cpu_count() or 2)
#: Version of the saved metric totals.
_TOTALS_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class Inherited:
    """What this process was handed when it started."""

    #: listening sockets systemd passed, by VM name (socket activation)
    listening: Mapping[str, int] = field(default_factory=dict)
    #: the connections the process before this one handed over, by VM name
    kept: Mapping[str, KeptVm] = field(default_factory=dict)
    #: a keeper holds our fds across restarts (systemd's fd store, or supervise)
    fd_store: bool = False
    #: the service manager's notify socket ($NOTIFY_SOCKET; none: nothing is sent)
    notifier: Notifier = field(default_factory=lambda: Notifier({}))


class Daemon:
    """Serves every configured VM until cancelled."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        inherited: Inherited | None = None,
        passthrough_markers: tuple[str, ...] = VFIO_MARKERS,
    ) -> None:
        inherited = inherited if inherited is not None else Inherited()
        self.settings = settings
        self.vms = settings.vms
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics_address: tuple[str, int] | None = None
        self.notifier = inherited.notifier
        #: the keeper of our fds across restarts (disabled: a restart ends every link)
        self.store = FdStore(self.notifier, enabled=inherited.fd_store)
        #: listening sockets systemd passed, by VM name (socket activation)
        self._activated = dict(inherited.listening)
        #: what the keeper passed us from the process before, by VM name
        self._kept = self._usable(inherited.kept)
        #: where the metric totals are saved for the next process (with a keeper)
        self._totals: StateFile | None = None
        self.connections: dict[str, VmConnection] = {}
        #: each VM's balloon target in bytes, kept across its connections
        self.targets: dict[str, int] = {}
        #: VMs whose target was set by hand: the automatic policy leaves them alone
        self.pins: set[str] = set()
        self._listeners: dict[str, tuple[Listener, trio.CancelScope]] = {}
        self._control: Listener | None = None
        self._nursery: trio.Nursery | None = None
        self._auto: tuple[AutoBalloonRunner, trio.CancelScope] | None = None
        #: how every connection is served, but for each VM's own discard setting
        self._serving = ConnectionOptions(
            discard=True,
            discard_pool=DiscardPool(DISCARD_THREADS),
            stats_interval=settings.stats_interval,
            features=DEFAULT_FEATURES
            | (BalloonFeature.DEFLATE_ON_OOM if settings.deflate_on_oom else 0),
            # looks at QEMU's open files for passthrough devices (tests name theirs)
            peer_scans=PeerScans(passthrough_markers),
            metrics=self.metrics,
            targets=self.targets,
        )
        for vm in self.vms:
            self.metrics.add_vm(vm.name)
        self.metrics.watch_memory(self.memory_snapshot)

    def _usable(self, kept: Mapping[str, KeptVm]) -> dict[str, KeptVm]:
        """What the process before left with the keeper, if there is a keeper now."""
        if kept and not self.store.enabled:
            log.warning(
                "stored_fds_without_keeper", vms=sorted(kept),
                message="fds from an earlier process were passed, but no fd store is in "
                "use now; those connections are closed",
            )  # fmt: skip
            for entry in kept.values():
                close_fds(entry.fds.values())
            return {}
        return dict(kept)

    # -- running ------------------------------------------------------------------------
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
                self._start_auto_balloon(self.settings.auto_balloon)
                await self._adopt_connections()
                for listener, scope in self._listeners.values():
                    nursery.start_soon(self._accept_loop, listener, scope)
                self._ready()
                task_status.started()
        finally:
            self._close_all()
            log.info("daemon_stopped")

    def _ready(self) -> None:
        address = self.metrics_address
        log.info(
            "daemon_ready",
            vms=[vm.name for vm in self.vms],
            sockets=[str(vm.socket) for vm in self.vms],
            metrics=f"http://{address[0]}:{address[1]}/metrics" if address else None,
        )
        self.notifier.ready(self._status())

    async def _open_all(self) -> list[trio.SocketListener]:
        """Everything that can fail at start-up, before anything is served: the carried
        totals, every VM's socket, the metrics listeners (returned), the control socket."""
        if self.store.enabled:
            self._carry_totals()
        for vm in self.vms:
            self._listeners[vm.name] = (self._open_listener(vm), trio.CancelScope())
        http = await self._open_metrics()
        where = self.settings.control_socket
        if where is not None:
            sock = bind("control socket", where, SocketAccess(mode=0o600))
            self._control = Listener(VmSpec("control", where), sock)
        return http

    async def _open_metrics(self) -> list[trio.SocketListener]:
        if self.settings.metrics_listen is None:
            return []
        host, port = self.settings.metrics_listen
        try:
            http = await open_metrics_listeners(host, port)
        except OSError as err:
            raise StartupError(
                f"cannot serve metrics on {host}:{port}: {err.strerror}; choose another "
                "--metrics-listen"
            ) from None
        bound = http[0].socket.getsockname()
        self.metrics_address = (bound[0], bound[1])
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
        for entry in self._kept.values():  # never adopted: startup failed
            close_fds(entry.fds.values())
        if self._control is not None:
            self._control.close()
            self._control = None
        self._serving.discard_pool.close()  # every connection has ended

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog at half its interval for as long as the event loop
        runs: a daemon whose loop is stuck stops pinging and systemd restarts it."""
        seconds = self.notifier.watchdog_seconds
        if seconds is None:
            return
        while True:
            self.notifier.notify("WATCHDOG=1")
            await trio.sleep(seconds / 2)

    def _status(self) -> str:
        return f"{len(self.connections)} of {len(self.vms)} VMs attached"

    # -- the VMs' sockets -----------------------------------------------------------------
    def _open_listener(self, vm: VmSpec) -> Listener:
        """VM ``vm``'s socket: the one systemd passed, the one the process before kept,
        or a new one (then handed to the keeper, if any)."""
        fd = self._activated.pop(vm.name, None)
        if fd is not None:
            return Listener(vm, inherited_listener(vm, fd), owned=False)
        entry = self._kept.get(vm.name)
        kept = entry.fds.pop(fd_name(vm.name, "listen"), None) if entry else None
        if kept is not None:
            sock = inherited_listener(vm, kept)
            if sock.getsockname() == str(vm.socket) and os.path.exists(vm.socket):
                return Listener(vm, sock, owned=False)
            sock.close()  # the VM's socket path changed while we were away
            self.store.drop(fd_name(vm.name, "listen"))
        listener = Listener(vm, bind(f"VM {vm.name}", vm.socket, self.settings.access))
        if self.store.enabled:
            # The next process listens on this very socket; the file stays on exit.
            self.store.put(fd_name(vm.name, "listen"), listener.sock.fileno())
            listener.owned = False
        return listener

    def _close_listener(self, listener: Listener, *, for_good: bool) -> None:
        if for_good and self.store.enabled:
            self.store.drop(fd_name(listener.vm.name, "listen"))
            listener.owned = True
        listener.close()

    # -- connections ----------------------------------------------------------------------
    async def _accept_loop(self, listener: Listener, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                sock, _ = await listener.sock.accept()
                if self._refused(listener.vm.name, sock):
                    sock.close()
                    continue
                name = listener.vm.name
                self._start_serving(VmConnection(sock, self._handover(name), self._options(name)))

    def _refused(self, vm: str, sock: trio.socket.SocketType) -> bool:
        """Whether a new connection is refused (logged and counted): a peer the
        settings do not allow, or a VM that has its QEMU already."""
        peer = peer_credentials(sock)
        groups = frozenset({peer.gid, *_supplementary_groups(sock)})
        if not self.settings.access.allows(peer.uid, groups):
            refusal = "peer_not_allowed"
        elif vm in self.connections:
            refusal = "vm_busy"
        else:
            return False
        log.warning(
            "connection_refused", vm=vm, reason=refusal, peer_pid=peer.pid, peer_uid=peer.uid,
            peer_gid=peer.gid, peer_groups=sorted(groups - {peer.gid}),
        )  # fmt: skip
        self.metrics.connections_refused.labels(vm=vm, reason=refusal).inc()
        return True

    def _start_serving(self, conn: VmConnection) -> None:
        self.connections[conn.vm] = conn
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, conn)

    async def _serve(self, conn: VmConnection) -> None:
        self.notifier.status(self._status())
        try:
            await conn.serve()
        finally:
            del self.connections[conn.vm]
            self.notifier.status(self._status())

    def _options(self, name: str) -> ConnectionOptions:
        """How VM ``name``'s connection is served (a VM no longer configured: defaults)."""
        discard = next((vm.discard for vm in self.vms if vm.name == name), True)
        return replace(self._serving, discard=discard)

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

    async def _adopt_connections(self) -> None:
        """Adopt the connections the process before us served."""
        known = {vm.name for vm in self.vms}
        for name, entry in sorted(self._kept.items()):
            leftover = entry.fds.pop(fd_name(name, "listen"), None)
            if leftover is not None:  # a VM no longer configured
                close_fds([leftover])
                self.store.drop(fd_name(name, "listen"))
            if not entry.fds:
                continue
            if name not in known:
                log.warning(
                    "unconfigured_vm_adopted", vm=name,
                    message="this VM is no longer configured, but its QEMU is still "
                    "attached; it is served until QEMU goes away",
                )  # fmt: skip
                self.metrics.add_vm(name)
            try:
                adoptable = check_kept(entry, self.store)
                conn = VmConnection.adopt(adoptable, self._options(name))
            except (AdoptError, VhostUserError, OSError) as err:
                log.error("adopt_failed", vm=name, error=str(err))
                continue
            self.metrics.adopted.labels(vm=name).inc()
            self._start_serving(conn)
        self._kept.clear()

    def _vm_connections(self) -> dict[str, VmConnection | None]:
        return {vm.name: self.connections.get(vm.name) for vm in self.vms}

    def memory_snapshot(self) -> dict[str, VmMemoryStats]:
        """Each VM's guest RAM and what of it the host holds (0 while detached)."""
        out = {}
        for vm in self.vms:
            conn = self.connections.get(vm.name)
            view = None if conn is None else conn.view()
            out[vm.name] = VmMemoryStats(0, 0) if view is None else VmMemoryStats(
                view.ram_bytes, view.resident_bytes
            )  # fmt: skip
        return out

    # -- the metric totals ----------------------------------------------------------------
    def _carry_totals(self) -> None:
        """Go on from the metric totals the process before us saved, and keep saving
        ours where the next process will find them."""
        entry = self._kept.pop(DAEMON, None)
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

    # -- the automatic balloon policy -----------------------------------------------------
    def _start_auto_balloon(self, settings: AutoBalloon | None) -> None:
        if settings is None or self._nursery is None:
            return
        runner = AutoBalloonRunner(
            settings, self.metrics.registry, lambda: self.connections,
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
        if self._auto is not None and settings is not None:
            self._auto[0].reconfigure(settings)
        elif self._auto is not None:
            self._auto[1].cancel()
            self._auto[0].stop()
            self._auto = None
            log.info("auto_balloon_stopped")
        else:
            self._start_auto_balloon(settings)

    # -- a new configuration (SIGHUP) -----------------------------------------------------
    def reload(self, settings: Settings) -> None:
        """Apply a new configuration: add and remove VMs, leave the others alone.

        A removed VM stops listening; a QEMU still attached to it keeps its connection
        until it goes away (cutting it would abort QEMU 11.1). A VM whose socket cannot
        be opened is logged and left out; the rest still applies. The metrics address
        and the control socket stay as they were (they need a restart).
        """
        self._reconfigure_auto_balloon(settings.auto_balloon)
        removed = self._remove_vms(settings.vms)
        self.settings = settings  # new sockets get the new access
        kept, added, failed = self._add_vms(settings.vms)
        self.vms = tuple(kept)
        self.settings = replace(settings, vms=self.vms)
        log.info(
            "config_reloaded", added=sorted(added), removed=sorted(removed), failed=failed,
            still_attached=sorted(n for n in removed if n in self.connections),
        )  # fmt: skip
        self.notifier.status(self._status())

    def _remove_vms(self, vms: Sequence[VmSpec]) -> list[str]:
        """Stop listening for the VMs no longer configured, or whose socket changed."""
        old = {vm.name: vm for vm in self.vms}
        new = {vm.name: vm for vm in vms}
        changed = [n for n in old.keys() & new.keys() if old[n].socket != new[n].socket]
        for name in old.keys() - new.keys():
            self.targets.pop(name, None)
            self.pins.discard(name)
        removed = sorted(old.keys() - new.keys()) + changed
        for name in removed:
            listener, scope = self._listeners.pop(name)
            scope.cancel()
            self._close_listener(listener, for_good=True)
        return removed

    def _add_vms(self, vms: Sequence[VmSpec]) -> tuple[list[VmSpec], list[str], list[str]]:
        """Listen for the VMs that are new (or whose socket changed); each attached VM
        takes its discard setting for its next report. The VMs served, added, failed."""
        kept: list[VmSpec] = []
        added, failed = [], []
        for vm in vms:
            conn = self.connections.get(vm.name)
            if conn is not None:
                conn.gate.enabled = vm.discard  # for its next report
            if vm.name not in self._listeners:
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
                added.append(vm.name)
            kept.append(vm)
        return kept, added, failed


def _supplementary_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    """The peer's supplementary groups (QEMU under libvirt: libvirt-qemu's primary group,
    kvm as a supplementary one). If the kernel will not say, only the primary counts."""
    try:
        return peer_groups(sock.fileno())
    except OSError as err:
        log.warning("peer_groups_unknown", error=str(err))
        return ()
