"""``soak``: a seeded chaos soak. Many VMs report free memory continuously while the
daemon, under ``supervise`` with its standby and the automatic policy on, is killed,
upgraded, reloaded and attacked, on a schedule drawn from a seed; invariants are
checked all along, and the first one broken stops the run.

    .venv/bin/python -m benchmarks soak [--seed 1] [--seconds 180] [--vms 16] [--guest]

The VMs are played by the Python frontend (tests/frontend.py: a real socket, memfd
guest RAM, real eventfds), each with canary pages it never reports. The faults, one at
a time at random moments:

``kill``      kill -9 of the daemon (the standby takes over, the VMs are adopted)
``upgrade``   SIGUSR2 to the supervisor (a fresh standby, then a planned restart)
``reload``    SIGHUP with a changed configuration: a VM added or removed, the
              automatic policy turned on or off
``reconnect`` one VM's frontend goes away and connects again (a new guest driver)
``hostile``   a frontend sends garbage to a spare VM's socket
``stuck``     a frontend floods a spare VM's socket with requests and reads nothing
``scrape``    a client opens /metrics' port and sends half a request
``balloon``   a balloon target set through the control socket
``unplug``    with ``--guest``: the real guest's balloon device unplugged while
              balloon commands for it race the unplug, then plugged back
``reset``     with ``--guest``: the real guest rebooted (system_reset) while balloon
              commands for it race the reset
              (benchmarks/soak_guest.py says what must hold for the guest)

A kill comes at least 6 s after the daemon started: supervise counts a daemon that
dies within 5 s of its start as failing to start and waits longer before the next.

Invariants, checked as the run goes: every report is handed back within
``--bound`` seconds, its blocks are holes in guest RAM by then, and the canaries hold
their bytes; no VM's connection ends but the ones the schedule ends; the supervisor
lives and the daemon exits only when the schedule kills it; no counter on /metrics
ever goes down (a scrape every 100 ms, across every restart; the policy's decision
counter, which restarts from 0 by design, excepted, and the guest's own statistics
once after each reboot of the real guest); and, at every point where the
restarts have settled, the daemon's and the supervisor's fds and the daemon's memory
stay where they were at the first such point with the same VMs attached; no daemon
fails to adopt a connection. A broken invariant prints the seed, the events before
it and the daemon's last log lines, and exits 1: the same seed draws
the same schedule again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from benchmarks import soak_guest
from benchmarks.soak_guest import RealGuest
from testbed.guestrun import Scrape, allocated_between, parse_metrics
from tests.frontend import PAGE, FakeFrontend, GuestMemfd, MiB
from vhost_user_balloon.daemon.commands.control import ControlError, ask

#: Guest RAM per VM; reports name 2 MiB blocks from REPORT_BASE up.
RAM: Final = 64 * MiB
REPORT_BASE: Final = 16 * MiB
BLOCK: Final = 2 * MiB
#: Canary pages: never reported, checked after every report.
CANARY_AT: Final = 1 * MiB
CANARIES: Final = 16
#: Where the fake driver puts its rings (as FakeFrontend.start does) and how far.
RINGS: Final = (0x1000, 0x1000 + 5 * 0x2000)
FAULTS: Final = ("kill", "upgrade", "reload", "reconnect", "hostile", "stuck", "scrape", "balloon")
#: The spare VM the hostile frontends connect to (no guest of the soak uses it).
SPARE: Final = "spare"
#: The VM reloads add and remove (never attached).
EXTRA: Final = "extra"
#: Counters that start again from 0 in a new process by design (README, limitations).
NOT_CARRIED: Final = ("vhost_user_balloon_auto_balloon_decisions_total",)
#: The guest's own statistics, counted since its boot: a reboot of the real guest
#: starts its series again.
SINCE_BOOT: Final = "vhost_user_balloon_guest_"


class Violation(Exception):
    """An invariant broke; the message says which and with what values."""


@dataclass
class Vm:
    """One VM of the soak: its guest RAM, its frontend, what it has seen."""

    name: str
    guest: GuestMemfd
    canary: bytes
    #: this VM's own draws (the schedule's are apart: the same seed, the same faults)
    rng: random.Random
    fe: FakeFrontend | None = None
    backend: socket.socket | None = None
    #: set by the schedule: the frontend goes away and comes back
    reconnect: bool = False
    reconnecting: bool = False
    completions: list[float] = field(default_factory=list)


@dataclass
class Soak:
    """The run: its schedule, its processes, what it measured."""

    seed: int
    seconds: float
    bound: float
    folder: Path
    vm_names: list[str]
    rng: random.Random = field(init=False)
    t0: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    scrape_ms: list[float] = field(default_factory=list)
    #: each counter's last value, and the guest reboots its going down was allowed for
    counters: dict[str, tuple[float, int]] = field(default_factory=dict)
    settled: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    kills: int = 0
    #: daemons that are gone (killed, or stopped for an upgrade)
    gone: set[int] = field(default_factory=set)
    restarts: list[float] = field(default_factory=list)
    #: faults under way that connect to the spare VM or the metrics port
    transient: int = 0
    #: the latest scrape, and when it was taken
    scrape: Scrape = field(default_factory=lambda: Scrape({}, set()))
    scraped_at: float = 0.0
    #: when the last transient fault ended
    transient_ended: float = 0.0
    #: held by the scraper while a scrape is under way, and while fds are counted (a
    #: scrape in flight is a socket the daemon holds for a moment)
    quiet: trio.Lock = field(default_factory=trio.Lock)
    extra_configured: bool = False
    auto_on: bool = True
    port: int = 0
    sup: subprocess.Popen[str] | None = None
    vms: dict[str, Vm] = field(default_factory=dict)
    violation: str | None = None
    #: the real guest, with --guest
    guest: RealGuest | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, detail: str = "") -> None:
        self.events.append((self.now(), kind, detail))

    def fail(self, message: str) -> None:
        if self.violation is None:
            self.violation = message
            self.event("VIOLATION", message)
        raise Violation(message)

    # -- the daemon ------------------------------------------------------------------
    def socket_of(self, name: str) -> Path:
        return self.folder / f"{name}.sock"

    def write_config(self) -> None:
        names = [*self.vm_names, SPARE, *([EXTRA] if self.extra_configured else [])]
        vms = "".join(f'[[vm]]\nname = "{n}"\nsocket = "{self.socket_of(n)}"\n\n' for n in names)
        if self.guest is not None:
            vms += self.guest.config_entry(self.socket_of(soak_guest.NAME))
        auto = '[auto_balloon]\nbudget = "256M"\ninterval = 1\n\n' if self.auto_on else ""
        (self.folder / "config.toml").write_text(
            f'metrics_listen = "127.0.0.1:{self.port}"\nlog_format = "json"\n'
            f'control_socket = "{self.folder / "control.sock"}"\n\n{auto}{vms}'
        )

    def start_supervisor(self) -> None:
        self.write_config()
        self.sup = subprocess.Popen(
            [sys.executable, "-m", "vhost_user_balloon", "supervise",
             "--config", str(self.folder / "config.toml"), "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read_logs, daemon=True).start()

    def _read_logs(self) -> None:
        assert self.sup is not None and self.sup.stdout is not None
        for line in self.sup.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "unparsed", "line": line.strip()}
            record["seen"] = self.now()
            self.logs.append(record)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in list(self.logs) if r.get("event") == event]

    def daemon_pid(self) -> int:
        started = self.log_events("daemon_started")
        return int(started[-1]["pid"]) if started else 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _fd_kinds(pid: int) -> dict[str, int]:
    """A process's fds by what they are (eventfd, socket, memfd, ...)."""
    kinds: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/memfd:"):  # guest-ram, or a state file: by whose
                kind = "memfd:" + target[7:].split(" ")[0].removeprefix("vhost-user-balloon-")
            elif target.startswith("anon_inode:"):
                kind = target
            else:
                kind = target.split(":")[0] if ":" in target else target.split("/")[1]
            kinds[kind] += 1
    except OSError:
        pass
    return dict(kinds)


def _rss_kib(pid: int) -> int:
    """Resident memory without the guest RAM the process maps (RssShmem)."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                fields[key] = int(rest.split()[0])
    except OSError:
        return -1
    return fields.get("VmRSS", 0) - fields.get("RssShmem", 0)


# -- the VMs -----------------------------------------------------------------------------
async def attach(soak: Soak, vm: Vm) -> None:
    """Connect ``vm``'s frontend as a freshly booted guest (rings cleared), retrying
    while the daemon still holds the connection before it (it refuses a second)."""
    vm.guest.ram.write(RINGS[0], bytes(RINGS[1] - RINGS[0]))
    deadline = trio.current_time() + soak.bound
    while True:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            fe = await FakeFrontend.connect(str(soak.socket_of(vm.name)), vm.guest)
            try:
                await fe.handshake(protocol=0x228, backend_fd=theirs.fileno())
                await fe.start()
            except BaseException:
                await fe.aclose()
                raise
        except (EOFError, OSError):
            ours.close()
            if trio.current_time() > deadline:
                soak.fail(f"{vm.name} could not attach again within {soak.bound:g} s")
            await trio.sleep(0.2)
            continue
        finally:
            theirs.close()
        vm.fe, vm.backend = fe, ours
        return


def drain_backend(vm: Vm) -> None:
    """Read the config-change notices the daemon sends (QEMU would act on them)."""
    if vm.backend is None:
        return
    try:
        while vm.backend.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


async def report_once(soak: Soak, vm: Vm) -> None:
    """One report of a few random blocks; then the invariants of a report."""
    assert vm.fe is not None
    count = vm.rng.randint(1, 8)
    firsts = vm.rng.sample(range((RAM - REPORT_BASE) // BLOCK), count)
    blocks = [(REPORT_BASE + i * BLOCK, BLOCK) for i in firsts]
    for gpa, length in blocks:
        vm.guest.populate(gpa, length, byte=0x5A)
    started = soak.now()
    try:
        await vm.fe.report(3, blocks, timeout=soak.bound)
    except trio.TooSlowError:
        soak.fail(f"{vm.name}: a report of {count} blocks was not handed back within "
                  f"{soak.bound:g} s")  # fmt: skip
    except (EOFError, OSError) as err:
        soak.fail(f"{vm.name}: its connection ended under a report: {err!r}")
    soak.latencies.append((started, soak.now() - started))
    vm.completions.append(soak.now())
    held = [gpa for gpa, length in blocks if allocated_between(vm.guest.fd, gpa, gpa + length)]
    if held:
        soak.fail(f"{vm.name}: reported blocks still held after the report came back: {held}")
    if vm.guest.map[CANARY_AT : CANARY_AT + CANARIES * PAGE] != vm.canary:
        soak.fail(f"{vm.name}: a canary page changed")


async def vm_loop(soak: Soak, vm: Vm) -> None:
    while True:
        if vm.reconnect:
            vm.reconnect, vm.reconnecting = False, True
            assert vm.fe is not None
            await vm.fe.aclose()
            if vm.backend is not None:
                vm.backend.close()
            await trio.sleep(vm.rng.uniform(0.1, 1.0))
            await attach(soak, vm)
            vm.reconnecting = False
            soak.event("reconnected", vm.name)
        await report_once(soak, vm)
        drain_backend(vm)
        if vm.rng.random() < 0.2:  # a vCPU reading the balloon's config
            assert vm.fe is not None
            with trio.fail_after(soak.bound):
                try:
                    await vm.fe.get_config()
                except (EOFError, OSError) as err:
                    soak.fail(f"{vm.name}: its connection ended: {err!r}")
        await trio.sleep(vm.rng.uniform(0.02, 0.4))


# -- watching ---------------------------------------------------------------------------
async def scraper(soak: Soak) -> None:
    """/metrics every 100 ms: no counter may ever go down, across every restart."""
    url = f"http://127.0.0.1:{soak.port}/metrics"

    def get() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode())
        except OSError:
            return None  # between two daemons

    while True:
        t = time.perf_counter()
        async with soak.quiet:
            text = await trio.to_thread.run_sync(get)
        if text is not None:
            soak.scrape_ms.append((time.perf_counter() - t) * 1e3)
            check_counters(soak, text)
            soak.scrape, soak.scraped_at = parse_metrics(text), soak.now()
        await trio.sleep(0.1)


def check_counters(soak: Soak, text: str) -> None:
    scrape = parse_metrics(text)
    counters = {
        key: value for key, value in scrape.items()
        if key.split("{")[0].endswith(("_total", "_count", "_sum", "_bucket"))
        and not key.startswith(NOT_CARRIED)
    }  # fmt: skip
    resets = 0 if soak.guest is None else soak.guest.resets
    for key, value in counters.items():
        before, reboots = soak.counters.get(key, (0.0, resets))
        if value < before:
            guests = key.startswith(SINCE_BOOT) and f'vm="{soak_guest.NAME}"' in key
            if not (guests and resets > reboots):
                soak.fail(f"counter {key} went down: {before:g} -> {value:g}")
            reboots = resets  # a reboot starts the guest's statistics again, once
        soak.counters[key] = (value, reboots)


async def supervisor_watch(soak: Soak) -> None:
    """The supervisor lives; the daemon exits only when the schedule kills it."""
    assert soak.sup is not None
    seen = 0
    while True:
        if soak.sup.poll() is not None:
            soak.fail(f"the supervisor exited ({soak.sup.returncode})")
        exits = soak.log_events("daemon_exited")
        for record in exits[seen:]:
            if record.get("how") != "killed by SIGKILL":
                soak.fail(f"the daemon exited by itself: {record}")
        if len(exits) > soak.kills:
            soak.fail(f"{len(exits)} daemon exits for {soak.kills} kills: {exits[-1]}")
        if soak.log_events("daemon_failed_to_start") or soak.log_events("standby_lost"):
            soak.fail("the supervisor could not start a daemon")
        if failed := soak.log_events("adopt_failed"):  # nothing the soak does corrupts state
            soak.fail(f"a daemon could not adopt a connection: {failed[-1]}")
        seen = len(exits)
        await trio.sleep(0.2)


async def settled(soak: Soak, timeout: float = 30.0) -> int:
    """Wait until the daemon serving now is ready, its standby armed and every VM
    attached; the daemon's pid."""
    with trio.fail_after(timeout):
        while True:
            pid = soak.daemon_pid()
            ready = [r for r in soak.log_events("daemon_reported_ready") if r.get("pid") == pid]
            standbys = soak.log_events("standby_started")
            waiting = standbys[-1]["pid"] if standbys else None
            armed = waiting != pid and any(
                r.get("pid") == waiting for r in soak.log_events("standby_armed")
            )
            attached = not any(vm.reconnecting or vm.reconnect for vm in soak.vms.values())
            attached &= soak.guest is None or not soak.guest.unplugging
            # no connection but the VMs': the spare VM's last one is gone, as the daemon
            # says after the fault that made it ended
            alone = (
                soak.transient == 0
                and soak.scraped_at > soak.transient_ended
                and soak.scrape.get(f'vhost_user_balloon_connected{{vm="{SPARE}"}}') == 0
            )
            if pid not in soak.gone and ready and armed and attached and alone:
                return pid
            await trio.sleep(0.1)


async def sample_resources(soak: Soak) -> None:
    """At a point where restarts have settled: fds and memory, checked against the
    first point with the same VMs configured."""
    pid = await settled(soak)
    assert soak.sup is not None
    started = [r for r in soak.log_events("daemon_started") if r.get("pid") == pid]
    async with soak.quiet:
        await trio.sleep(0.1)  # the daemon's end of the last scrape closes
        sample = {
            "t": soak.now(), "extra": soak.extra_configured, "auto": soak.auto_on,
            "standby": bool(started and started[-1].get("standby")),
            "daemon_fds": _fd_count(pid), "supervisor_fds": _fd_count(soak.sup.pid),
            "rss_kib": _rss_kib(pid), "kinds": _fd_kinds(pid),
        }  # fmt: skip
    if pid in soak.gone or min(sample["daemon_fds"], sample["rss_kib"]) <= 0:
        return  # it went meanwhile: nothing to compare
    soak.settled.append(sample)
    first = next(s for s in soak.settled if s["extra"] == sample["extra"])
    check_flat(soak, first, sample)


#: The discard pool keeps an eventfd per caller that ever waited at once: at most the
#: VMs' queues that use it (reports and inflates), whatever the moment they were counted.
POOL_CALLERS_PER_VM: Final = 2


def check_flat(soak: Soak, first: dict[str, Any], now: dict[str, Any]) -> None:
    """Every kind of fd the daemon holds, but the pool's eventfds, exactly as at the
    first point with the same VMs configured; the supervisor's fds exactly; memory
    within 24 MiB."""
    kinds = set(first["kinds"]) | set(now["kinds"])
    grown = {
        kind: (first["kinds"].get(kind, 0), now["kinds"].get(kind, 0)) for kind in kinds
        if now["kinds"].get(kind, 0) > first["kinds"].get(kind, 0)
        + (POOL_CALLERS_PER_VM * (len(soak.vms) + (soak.guest is not None))
           if kind == "anon_inode:[eventfd]" else 0)
    }  # fmt: skip
    if grown:
        soak.fail(f"the daemon holds more fds than at t={first['t']:.0f} s: {grown}")
    if now["supervisor_fds"] > first["supervisor_fds"]:
        soak.fail(f"the supervisor holds {now['supervisor_fds']} fds, "
                  f"{first['supervisor_fds']} at t={first['t']:.0f} s")  # fmt: skip
    if now["rss_kib"] > first["rss_kib"] + 24 * 1024:
        soak.fail(f"the daemon's memory grew from {first['rss_kib']} to {now['rss_kib']} KiB")


# -- the faults --------------------------------------------------------------------------
async def kill(soak: Soak) -> None:
    pid = await settled(soak)
    up = [r for r in soak.log_events("daemon_started") if r.get("pid") == pid]
    await trio.sleep(max(0.0, 6.0 - (soak.now() - up[-1]["seen"])) if up else 6.0)
    soak.kills += 1
    soak.restarts.append(soak.now())
    soak.gone.add(pid)
    os.kill(pid, signal.SIGKILL)
    soak.event("kill", f"daemon {pid}")
    await sample_resources(soak)


async def upgrade(soak: Soak) -> None:
    pid = await settled(soak)
    assert soak.sup is not None
    soak.restarts.append(soak.now())
    soak.gone.add(pid)
    os.kill(soak.sup.pid, signal.SIGUSR2)
    soak.event("upgrade", f"daemon {pid}")
    with trio.fail_after(40):
        while soak.daemon_pid() == pid:
            await trio.sleep(0.1)
    await sample_resources(soak)


async def reload(soak: Soak) -> None:
    assert soak.sup is not None
    if soak.rng.random() < 0.5:
        soak.extra_configured = not soak.extra_configured
    else:
        soak.auto_on = not soak.auto_on
    soak.write_config()
    reloads = len(soak.log_events("config_reloaded"))
    os.kill(soak.sup.pid, signal.SIGHUP)
    soak.event("reload", f"extra={soak.extra_configured} auto={soak.auto_on}")
    with trio.fail_after(soak.bound):
        while len(soak.log_events("config_reloaded")) <= reloads:
            if soak.log_events("reload_failed"):
                soak.fail(f"a reload failed: {soak.log_events('reload_failed')[-1]}")
            await trio.sleep(0.1)


async def reconnect(soak: Soak) -> None:
    vm = soak.vms[soak.rng.choice(sorted(soak.vms))]
    vm.reconnect = True
    soak.event("reconnect", vm.name)
    with trio.fail_after(soak.bound * 2):
        while vm.reconnect or vm.reconnecting:
            await trio.sleep(0.1)


async def hostile(soak: Soak) -> None:
    """Garbage to the spare VM's socket: that connection ends, nothing else notices."""
    garbage = soak.rng.randbytes(soak.rng.randint(1, 4096))
    soak.transient += 1
    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(soak.socket_of(SPARE)))
            await sock.send(garbage)
            soak.event("hostile", f"{len(garbage)} bytes")
            await trio.sleep(1.0)
    except OSError as err:  # refused while another fault holds the spare VM: fine
        soak.event("hostile", f"refused: {err!r}")
    finally:
        soak.transient -= 1
        soak.transient_ended = soak.now()


async def stuck(soak: Soak) -> None:
    """A frontend that sends requests and reads no reply, for a few seconds."""
    seconds = soak.rng.uniform(1.0, 4.0)
    soak.transient += 1
    try:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(soak.socket_of(SPARE)))
            get_features = (1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(4)
            sent = 0
            with trio.move_on_after(seconds):
                while True:
                    sent += await sock.send(get_features * 64)
            soak.event("stuck", f"{sent} bytes sent, none read")
    except OSError as err:
        soak.event("stuck", f"refused: {err!r}")
    finally:
        soak.transient -= 1
        soak.transient_ended = soak.now()


async def scrape_stall(soak: Soak) -> None:
    """Half a request to /metrics, held past the daemon's request timeout."""
    soak.transient += 1
    try:
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", soak.port))
            await sock.send(b"GET /metrics HTTP/1.1\r\n")
            soak.event("scrape", "half a request")
            await trio.sleep(6.0)
    except OSError as err:  # between two daemons
        soak.event("scrape", f"refused: {err!r}")
    finally:
        soak.transient -= 1
        soak.transient_ended = soak.now()


async def balloon(soak: Soak) -> None:
    vm = soak.rng.choice(sorted(soak.vms))
    request: dict[str, object] = {"vm": vm}
    if soak.rng.random() < 0.7:
        request["target_bytes"] = soak.rng.randrange(0, 32) * MiB
    else:
        request["release"] = True
    control = str(soak.folder / "control.sock")
    try:
        await trio.to_thread.run_sync(ask, control, request)
        soak.event("balloon", json.dumps(request))
    except ControlError as err:  # the daemon between two processes, say
        soak.event("balloon", f"{json.dumps(request)}: {err}")


async def unplug(soak: Soak) -> None:
    assert soak.guest is not None
    await soak_guest.unplug(soak, soak.guest)


async def reset(soak: Soak) -> None:
    assert soak.guest is not None
    await soak_guest.reset(soak, soak.guest)


FAULT_RUNNERS: Final = {
    "kill": kill, "upgrade": upgrade, "reload": reload, "reconnect": reconnect,
    "hostile": hostile, "stuck": stuck, "scrape": scrape_stall, "balloon": balloon,
    "unplug": unplug, "reset": reset,
}  # fmt: skip


async def schedule(soak: Soak, nursery: trio.Nursery) -> None:
    """One fault at a time, at random moments; the ones that only connect and wait
    (hostile, stuck, scrape) go on beside the next."""
    await sample_resources(soak)
    end = soak.seconds
    kinds = (*FAULTS, "unplug", "reset") if soak.guest is not None else FAULTS
    while soak.now() < end:
        await trio.sleep(soak.rng.expovariate(1 / 3.0))
        kind = soak.rng.choice(kinds)
        soak.faults[kind] += 1
        if kind in ("hostile", "stuck", "scrape"):
            nursery.start_soon(FAULT_RUNNERS[kind], soak)
        else:
            await FAULT_RUNNERS[kind](soak)
    await sample_resources(soak)


# -- the run ----------------------------------------------------------------------------
async def soak_run(soak: Soak) -> None:
    soak.port = _port()
    soak.start_supervisor()
    for name in soak.vm_names:
        rng = random.Random(f"{soak.seed}-{name}")
        canary = rng.randbytes(CANARIES * PAGE)
        vm = Vm(name, GuestMemfd(RAM), canary, rng)
        vm.guest.map[CANARY_AT : CANARY_AT + len(canary)] = canary
        soak.vms[name] = vm
    with trio.fail_after(60):
        while not soak.log_events("daemon_reported_ready"):
            await trio.sleep(0.1)
    try:
        for vm in soak.vms.values():
            await attach(soak, vm)
        soak.event("start", f"{len(soak.vms)} VMs attached")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scraper, soak)
            nursery.start_soon(supervisor_watch, soak)
            if soak.guest is not None:
                await soak_guest.attach_guest(soak, soak.guest)
                nursery.start_soon(soak_guest.guest_watch, soak, soak.guest)
            for vm in soak.vms.values():
                nursery.start_soon(vm_loop, soak, vm)
            await schedule(soak, nursery)
            nursery.cancel_scope.cancel()
        soak.event("end", "")
    finally:
        for vm in soak.vms.values():
            if vm.fe is not None:
                await vm.fe.aclose()
            if vm.backend is not None:
                vm.backend.close()


def stop(soak: Soak) -> int | None:
    """Stop the supervisor (and its daemon) as systemd would; its exit status."""
    if soak.sup is None:
        return None
    if soak.sup.poll() is None:
        soak.sup.send_signal(signal.SIGTERM)
        try:
            soak.sup.wait(20)
        except subprocess.TimeoutExpired:
            soak.sup.kill()
            soak.sup.wait()
    return soak.sup.returncode


def figures(soak: Soak) -> dict[str, object]:
    times = sorted(latency for _, latency in soak.latencies)
    near = sorted(latency for start, latency in soak.latencies
                  if any(start - 1 <= r <= start + latency for r in soak.restarts))  # fmt: skip
    gaps = [max((b - a for a, b in zip(vm.completions, vm.completions[1:], strict=False)),
                default=0.0) for vm in soak.vms.values()]  # fmt: skip
    scrapes = sorted(soak.scrape_ms)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else 0.0

    out: dict[str, object] = {
        "seed": soak.seed, "seconds": round(soak.now(), 1), "faults": dict(soak.faults),
        "reports": len(times),
        "report_ms": {q: round(pct(times, p) * 1e3, 1) for q, p in
                      (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "report_ms_near_restarts": {q: round(pct(near, p) * 1e3, 1) for q, p in
                                    (("n", 0.0), ("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "longest_gap_s": round(max(gaps, default=0.0), 2),
        "scrape_ms": {q: round(pct(scrapes, p), 1) for q, p in
                      (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "settled": soak.settled,
    }  # fmt: skip
    if soak.guest is not None:
        out["guest"] = soak_guest.figures(soak, soak.guest)
    if isinstance(out["report_ms_near_restarts"], dict):
        out["report_ms_near_restarts"]["n"] = len(near)
    return out


def print_figures(out: dict[str, object]) -> None:
    settled = out.pop("settled")
    print(json.dumps(out, indent=1))
    assert isinstance(settled, list)
    for s in settled:  # what may vary with the moment (the pool's eventfds) apart
        s["pool_and_queue_eventfds"] = s["kinds"].get("anon_inode:[eventfd]", 0)
        s["other_daemon_fds"] = s["daemon_fds"] - s["pool_and_queue_eventfds"]
    # The trend from the first point a minute in (the first minute warms up: the
    # discard pool's threads and eventfds, the allocator's arenas) to the last.
    warm = [s for s in settled if s["t"] >= 60] or settled
    hours = max((warm[-1]["t"] - warm[0]["t"]) / 3600, 1e-9)
    for key in ("other_daemon_fds", "pool_and_queue_eventfds", "supervisor_fds", "rss_kib"):
        values = [s[key] for s in settled]
        slope = (warm[-1][key] - warm[0][key]) / hours if len(warm) > 1 else 0.0
        print(f"{key}: first {values[0]}, last {values[-1]}, min {min(values)}, "
              f"max {max(values)} over {len(values)} settled points; "
              f"{slope:+.1f}/h after the first minute")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks soak", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="draws the schedule (default 1)")
    p.add_argument("--seconds", type=float, default=180.0, help="how long (default 180)")
    p.add_argument("--vms", type=int, default=16, help="VMs reporting (default 16)")
    p.add_argument("--bound", type=float, default=20.0,
                   help="seconds a report may take, restarts included (default 20)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--guest", action="store_true",
                   help="also a real guest (QEMU and a guest kernel, as scripts/setup "
                        "provides) whose balloon device the schedule unplugs and plugs "
                        "back, and which it reboots")  # fmt: skip
    args = p.parse_args(argv)
    env = soak_guest.environment() if args.guest else None
    # With a guest, a folder QEMU reaches too (it may run in a chroot).
    where = None if env is None else env.qemu_root / "tmp"
    with tempfile.TemporaryDirectory(prefix="vub-soak-", dir=where) as tmp:
        soak = Soak(args.seed, args.seconds, args.bound, Path(tmp),
                    [f"vm{i:02d}" for i in range(args.vms)])  # fmt: skip
        if env is not None:
            soak.guest = RealGuest(env, Path(tmp))
        try:
            trio.run(soak_run, soak)
        except* (Violation, trio.TooSlowError) as group:
            soak.violation = soak.violation or repr(group.exceptions[0])
        finally:
            if soak.guest is not None:
                soak.guest.stop()
            status = stop(soak)
            for vm in soak.vms.values():
                vm.guest.close()
        if soak.violation is None and status != 0:
            soak.violation = f"the supervisor stopped with status {status}"
    out = figures(soak)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print_figures(out)
    if soak.violation is not None:
        print(f"\nVIOLATION (seed {soak.seed}): {soak.violation}\nthe events before it:")
        for t, kind, detail in soak.events[-30:]:
            print(f"  {t:8.2f}s  {kind:10} {detail}")
        if soak.guest is not None:
            print("the guest's console ended with:", *soak.guest.console[-12:], sep="\n  ")
        print("the daemon's last log lines:")
        for record in soak.logs[-25:]:
            fields = {k: v for k, v in record.items() if k not in ("timestamp", "level")}
            print(f"  {json.dumps(fields)[:300]}")
        return 1
    print(f"soak: seed {soak.seed}, {out['seconds']} s, no invariant broken")
    return 0
