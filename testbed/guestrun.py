"""Run a real Linux guest under QEMU with vhost-user-balloon attached, and measure.

Used by the end-to-end tests, the benchmarks and the demo (``testbed.demo``). It
starts the daemon (or, for the reference runs, QEMU's built-in virtio-balloon), starts
QEMU with the attach options users paste (qemu-config/*.args, read as shipped) and a
guest kernel and initramfs from testbed/provision, follows the guest's serial
console, samples host memory twice a second (the guest RAM memfd's allocated blocks,
read through /proc/QEMU_PID/fd, and QEMU's RssShmem), scrapes the daemon's /metrics,
and always cleans up: QEMU, the daemon and the run folder, on every exit path, with a
hard timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: What users paste: the attach options the tests read as they are shipped.
QEMU_CONFIG = HERE.parent / "qemu-config"
#: QEMU's own balloon with free page reporting: the reference runs' options.
BUILTIN_BALLOON = HERE / "builtin-balloon.args"
MiB = 1 << 20
DEFAULT_CACHE = Path(os.environ.get("VUB_CACHE", Path.home() / ".cache" / "vhost-user-balloon"))


class SetupError(RuntimeError):
    """The environment is not provisioned; the message says what to run."""


@dataclass(frozen=True)
class Env:
    """Where QEMU and the guest images are (written by testbed/provision)."""

    qemu_root: Path
    qemu_binary: str
    qemu_version: str
    kernels: dict[str, dict[str, str]]

    @classmethod
    def load(cls, cache: Path = DEFAULT_CACHE) -> Env:
        path = cache / "env.json"
        if not path.exists():
            raise SetupError(f"{path} is missing: run testbed/provision (as root) first")
        d = json.loads(path.read_text())
        return cls(Path(d["qemu_root"]), d["qemu_binary"], d["qemu_version"], d["kernels"])

    def inside(self, host_path: Path | str) -> str:
        """A host path as QEMU sees it (QEMU may run in a chroot)."""
        rel = os.path.relpath(host_path, self.qemu_root)
        if rel.startswith(".."):
            raise ValueError(f"{host_path} is outside QEMU's root {self.qemu_root}")
        return "/" + rel if rel != "." else "/"

    def command(self, args: list[str]) -> list[str]:
        if self.qemu_root == Path("/"):
            return [self.qemu_binary, *args]
        return ["chroot", str(self.qemu_root), self.qemu_binary, *args]

    def run_dir(self) -> Path:
        """A fresh folder both the host and QEMU can reach (parallel runs are safe)."""
        base = self.qemu_root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="vub-run-", dir=base))


def attach_args(name: str, **values: str) -> list[str]:
    """The QEMU options in qemu-config/NAME.args, placeholders filled."""
    return args_file(QEMU_CONFIG / f"{name}.args", **values)


def args_file(path: Path, **values: str) -> list[str]:
    """The QEMU options of an .args file (one option and its value per line, ``#``
    comments), placeholders filled."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out += line.format(**values).split(" ", 1)
    return out


@dataclass
class GuestSpec:
    kernel: str = "6.1"
    mem_mib: int = 2048
    #: room for memory plugged later, appended to -m: e.g. "slots=2,maxmem=4G"
    hotplug: str = ""
    workload_mib: int = 1024
    rounds: int = 1
    order: int | None = None
    settle_s: int = 30
    idle_s: int = 3
    balloon: str = "daemon"  # "daemon" or "builtin"
    #: qemu-config/ATTACH.args used with the daemon
    attach: str = "vhost-user-balloon"
    #: (old, new) replacements in the attach options, e.g. ("config_size=16", "config_size=0")
    edits: tuple[tuple[str, str], ...] = ()
    daemon_args: tuple[str, ...] = ()
    #: run the daemon under ``vhost-user-balloon supervise`` (restarts keep the VM)
    supervise: bool = False
    #: extra environment for the daemon, e.g. (("PYTHONPATH", "..."),)
    daemon_env: tuple[tuple[str, str], ...] = ()
    #: more guest kernel parameters, e.g. "init_on_free=1"
    append: str = ""
    #: more QEMU arguments, e.g. a disk
    qemu_extra: tuple[str, ...] = ()
    timeout_s: float = 300.0
    accel: str = "tcg"


@dataclass
class Sample:
    t: float
    memfd_bytes: int
    rss_shmem_bytes: int
    metrics: Scrape


@dataclass
class GuestRun:
    spec: GuestSpec
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    console: list[tuple[float, str]] = field(default_factory=list)
    markers: dict[str, float] = field(default_factory=dict)
    daemon_log: list[dict[str, object]] = field(default_factory=list)
    qemu_stderr: list[str] = field(default_factory=list)
    qemu_returncode: int | None = None
    daemon_returncode: int | None = None
    timed_out: bool = False
    metrics_url: str | None = None
    #: the process run_guest started for the daemon (a supervisor, with ``supervise``)
    started_pid: int | None = None
    #: /proc/QEMU_PID/fd/N of the guest RAM memfd, while QEMU runs
    memfd_path: str | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    def marker(self, name: str) -> float:
        if name not in self.markers:
            raise AssertionError(
                f"the guest never printed 'VUB: {name}'; console:\n"
                + "\n".join(line for _, line in self.console[-40:])
            )
        return self.markers[name]

    def memfd_at(self, t: float) -> int:
        """Guest RAM memfd allocation at the last sample taken at or before ``t``."""
        before = [s for s in self.samples if s.t <= t]
        if not before:
            raise AssertionError(f"no memory sample before t={t:.1f}s")
        return before[-1].memfd_bytes

    def floor(self) -> int:
        """Host memory the guest held just before its first workload round."""
        return self.memfd_at(self.marker("alloc round=1"))

    def peak(self) -> int:
        return max(s.memfd_bytes for s in self.samples)

    def final(self) -> int:
        """The level at the end of the workload: the guest's poweroff (QEMU may release
        its RAM as it exits) does not count."""
        end = self.markers.get("done", float("inf"))
        return self.memfd_at(end) if end != float("inf") else self.samples[-1].memfd_bytes

    def guest_used(self, phase: str = "settled") -> int:
        """Memory the guest itself was using (MemTotal - MemFree) at its last meminfo line
        of ``phase``: what no balloon can give back."""
        for _, line in reversed(self.console):
            if f"VUB: meminfo {phase} " in line:
                fields = dict(f.split(":") for f in line.split()[3:])
                return (int(fields["MemTotal"]) - int(fields["MemFree"])) * 1024
        raise AssertionError(f"no 'meminfo {phase}' line on the console")

    def held_beyond_use(self) -> int:
        """Host memory the guest RAM holds at the end beyond what the guest uses: the
        part a balloon is responsible for. Two boots of the same guest differ by tens of
        MiB in what the guest keeps for itself; this difference does not."""
        return self.final() - self.guest_used()

    def reclaim_seconds(self, round_: int = 1, slack: int = 64 * MiB) -> float | None:
        """From the guest's free to host memory back within ``slack`` of the floor."""
        freed = self.marker(f"freed round={round_}")
        floor = self.floor()
        for s in self.samples:
            if s.t >= freed and s.memfd_bytes <= floor + slack:
                return s.t - freed
        return None

    def metric(self, name: str, **labels: str) -> float:
        """Last scraped value of a daemon metric (summed over labels not given); a
        metric the daemon does not export is an error."""
        for s in reversed(self.samples):
            if s.metrics:
                return s.metrics.total(name, **labels)
        raise AssertionError(f"no scrape of /metrics to read {name} from")

    def metric_labels(self, name: str, label: str) -> dict[str, float]:
        for s in reversed(self.samples):
            if s.metrics:
                out: dict[str, float] = {}
                for k, v in s.metrics.items():
                    metric, labels = _split(k)
                    if metric == name and label in labels:
                        out[labels[label]] = out.get(labels[label], 0.0) + v
                return out
        return {}

    def daemon_events(self, event: str) -> list[dict[str, object]]:
        return [r for r in self.daemon_log if r.get("event") == event]

    def daemon_pid(self) -> int:
        """The serving daemon process now (under ``supervise``: its current child)."""
        started = self.daemon_events("daemon_started")
        if not started:
            if self.spec.supervise or self.started_pid is None:
                raise AssertionError("no daemon_started line from the supervisor")
            return self.started_pid
        return int(started[-1]["pid"])  # type: ignore[call-overload]


def _split(key: str) -> tuple[str, dict[str, str]]:
    if "{" not in key:
        return key, {}
    name, rest = key.split("{", 1)
    labels = {}
    for part in rest.rstrip("}").split(","):
        if part:
            k, v = part.split("=", 1)
            labels[k] = v.strip('"')
    return name, labels


def _matches(key: str, name: str, labels: dict[str, str]) -> bool:
    metric, have = _split(key)
    return metric == name and all(have.get(k) == v for k, v in labels.items())


class Scrape(dict[str, float]):
    """One /metrics page: each series' value by its key (``name{labels}`` as written),
    and the metric families it declares (``# TYPE``), so that asking for a metric the
    daemon does not export fails instead of reading as 0."""

    def __init__(self, values: dict[str, float], families: set[str]) -> None:
        super().__init__(values)
        self.families = families

    def check(self, name: str) -> None:
        """AssertionError unless ``name`` (a sample name) is of a declared family."""
        for suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix) and name.removesuffix(suffix) in self.families:
                return
        raise AssertionError(f"the daemon exports no metric {name}")

    def series(self, key: str) -> float:
        """One series by its key; 0 if its metric exists but this series does not yet."""
        self.check(_split(key)[0])
        return self.get(key, 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the series of ``name`` with these labels (0 if none)."""
        self.check(name)
        return sum(v for k, v in self.items() if _matches(k, name, labels))


def parse_metrics(text: str) -> Scrape:
    values, families = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                values[key] = float(value)
            except ValueError:
                continue
    return Scrape(values, families)


def allocated_between(fd: int, start: int, end: int) -> int:
    """Bytes of data (not holes) in [start, end) of a file, by SEEK_DATA/SEEK_HOLE."""
    total, pos = 0, start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        total += hole - data
        pos = hole
    return total


def qemu_memfd(pid: int, size: int | None = None) -> str | None:
    """/proc/PID/fd/N of QEMU's guest RAM backend (the first, or the one of ``size``
    bytes when it has several: hot-plugged memory)."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            link = os.readlink(path)
            if ("/memfd:" in link or "/hugepages/" in link) and (  # a guest RAM backend
                size is None or os.stat(path).st_size == size
            ):
                return path
    except OSError:
        return None
    return None


def _rss_shmem(pid: int) -> int:
    """QEMU's resident shared memory: RssShmem, plus HugetlbPages for hugetlbfs RAM
    (huge pages are not counted in RssShmem)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssShmem:", "HugetlbPages:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def pump(stream: object, sink: Callable[[str], None]) -> threading.Thread:
    def run() -> None:
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            sink(line.rstrip("\r\n"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, sig: int, grace: float
) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _start_daemon(run: GuestRun, sock: Path) -> subprocess.Popen[bytes]:
    """Start the daemon for one VM; wait until it listens and serves /metrics."""
    ready = threading.Event()

    def on_line(line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            record = {"event": "unparsed", "line": line}
        run.daemon_log.append(record)
        # The daemon's own line names its metrics URL (a supervisor's does not); a
        # restarted daemon listens on a new port.
        if record.get("event") == "daemon_ready" and "metrics" in record:
            run.metrics_url = str(record.get("metrics"))
            ready.set()

    command = [sys.executable, "-m", "vhost_user_balloon"]
    if run.spec.supervise:
        command.append("supervise")
    daemon = subprocess.Popen(
        [*command, "--vm", f"guest={sock}", "--metrics-listen", "127.0.0.1:0",
         "--log-format", "json", *run.spec.daemon_args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, **dict(run.spec.daemon_env)},
    )  # fmt: skip
    pump(daemon.stdout, on_line)
    if not ready.wait(20):
        stop_process(daemon, signal.SIGKILL, 1)
        raise SetupError("the daemon did not start: " + json.dumps(run.daemon_log[-5:]))
    return daemon


def qemu_args(spec: GuestSpec, env: Env, attach: list[str]) -> list[str]:
    for old, new in spec.edits:
        edited = [a.replace(old, new) for a in attach]
        if edited == attach:
            raise ValueError(f"edit {old!r} matches no attach option")
        attach = edited
    images = env.kernels[spec.kernel]
    append = (
        f"console=ttyS0 panic=-1 quiet vub.mib={spec.workload_mib} "
        f"vub.rounds={spec.rounds} vub.settle={spec.settle_s} vub.idle={spec.idle_s}"
    )
    if spec.order is not None:
        append += f" vub.order={spec.order}"
    if spec.append:
        append += " " + spec.append
    return [
        "-accel", spec.accel, "-m", ",".join(filter(None, [f"{spec.mem_mib}M", spec.hotplug])),
        "-smp", "1", "-nodefaults",
        "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", *attach,
        "-kernel", env.inside(images["kernel"]), "-initrd", env.inside(images["initrd"]),
        "-append", append, *spec.qemu_extra,
    ]  # fmt: skip


def _follow_console(run: GuestRun, qemu: subprocess.Popen[bytes]) -> None:
    def on_line(line: str) -> None:
        t = run.now()
        run.console.append((t, line))
        idx = line.find("VUB: ")
        if idx >= 0:
            text = line[idx + 5 :].strip()
            for key in (text, text.split(" mib=")[0]):
                run.markers.setdefault(key, t)

    pump(qemu.stdout, on_line)
    pump(qemu.stderr, run.qemu_stderr.append)


def _take_sample(run: GuestRun, pid: int) -> Sample:
    run.memfd_path = run.memfd_path or qemu_memfd(pid)
    metrics = Scrape({}, set())
    if run.metrics_url:
        try:
            with urllib.request.urlopen(run.metrics_url, timeout=2) as r:
                metrics = parse_metrics(r.read().decode())
        except OSError:
            pass
    try:
        allocated = os.stat(run.memfd_path).st_blocks * 512 if run.memfd_path else 0
    except OSError:
        allocated = 0
    return Sample(run.now(), allocated, _rss_shmem(pid), metrics)


def _watch(
    run: GuestRun,
    qemu: subprocess.Popen[bytes],
    on_sample: Callable[[GuestRun, Sample], None] | None,
    stop_when: Callable[[GuestRun], bool] | None,
) -> None:
    """Sample host memory twice a second until QEMU exits, ``stop_when`` says so, or
    the spec's time is up."""
    deadline = time.monotonic() + run.spec.timeout_s
    while qemu.poll() is None:
        if time.monotonic() > deadline:
            run.timed_out = True
            return
        sample = _take_sample(run, qemu.pid)
        if run.memfd_path:
            run.samples.append(sample)
            if on_sample:
                on_sample(run, sample)
        if stop_when and stop_when(run):
            return
        time.sleep(0.5)


def run_guest(
    spec: GuestSpec,
    env: Env | None = None,
    *,
    on_sample: Callable[[GuestRun, Sample], None] | None = None,
    stop_when: Callable[[GuestRun], bool] | None = None,
) -> GuestRun:
    """Boot the guest, run its workload, measure; QEMU and daemon are always stopped."""
    env = env or Env.load()
    if spec.kernel not in env.kernels:
        raise SetupError(
            f"no guest kernel {spec.kernel} provisioned "
            f"(have {', '.join(env.kernels)}); run testbed/provision"
        )
    run = GuestRun(spec)
    workdir = env.run_dir()
    daemon: subprocess.Popen[bytes] | None = None
    qemu: subprocess.Popen[bytes] | None = None
    try:
        mem = f"{spec.mem_mib}M"
        if spec.balloon == "daemon":
            sock = workdir / "vm.sock"
            daemon = _start_daemon(run, sock)
            run.started_pid = daemon.pid
            attach = attach_args(spec.attach, socket=env.inside(sock), mem=mem)
        else:
            attach = args_file(BUILTIN_BALLOON, mem=mem)
        qemu = subprocess.Popen(
            env.command(qemu_args(spec, env, attach)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _follow_console(run, qemu)
        _watch(run, qemu, on_sample, stop_when)
    finally:
        run.qemu_returncode = stop_process(qemu, signal.SIGTERM, 5)
        run.daemon_returncode = stop_process(daemon, signal.SIGTERM, 15)
        time.sleep(0.1)  # let the pumps drain
        shutil.rmtree(workdir, ignore_errors=True)
    return run
