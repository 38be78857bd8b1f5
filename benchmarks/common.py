"""What the benchmarks share: the daemon as a process of its own, a guest played by
the Python frontend, the baseline helper process, and how figures are printed.

These machines are noisy: each figure is a median over repeats, with its spread
(min..max), and CPU time is read per thread (``/proc/PID/task/*/schedstat``)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from tests.frontend import FakeFrontend, GuestMemfd, MiB

ROOT: Final = Path(__file__).resolve().parent.parent
#: Reported blocks live above the rings.
REPORT_BASE: Final = 64 * MiB


def spread(values: list[float], unit: str = "ms", scale: float = 1e3) -> str:
    v = sorted(values)
    return (
        f"median {statistics.median(v) * scale:8.3f} {unit}  "
        f"({v[0] * scale:.3f}..{v[-1] * scale:.3f}, n={len(v)})"
    )


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]


# -- the daemon as a process ----------------------------------------------------------
@contextlib.contextmanager
def daemon_process(
    names: list[str], *, supervise: list[str] | None = None, cwd: Path = ROOT
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The daemon as a process, run from the checkout ``cwd`` (``supervise``: under
    the supervisor, with these options of its own); its JSON log lines go to ``log``
    in the folder yielded."""
    with tempfile.TemporaryDirectory(prefix="vub-bench-") as tmp, open(f"{tmp}/log", "wb") as out:
        args = [a for n in names for a in ("--vm", f"{n}={tmp}/{n}.sock")]
        command = [sys.executable, "-m", "vhost_user_balloon"]
        if supervise is not None:
            command += ["supervise", *supervise]
        proc = subprocess.Popen(
            [*command, *args,
             "--metrics-listen", "none", "--log-format", "json", "--log-level", "warning"],
            stdout=out, stderr=subprocess.DEVNULL, cwd=cwd,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not all(Path(f"{tmp}/{n}.sock").exists() for n in names):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.02)
            yield proc, Path(tmp)
        finally:
            proc.terminate()
            proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads, in clock ticks' resolution (10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int) -> int:
    """CPU time every live thread of a process has had, in nanoseconds (the first field
    of each thread's schedstat): exact where ``cpu_seconds`` counts 10 ms ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@contextlib.asynccontextmanager
async def attached(sock: Path, size: int) -> AsyncIterator[tuple[FakeFrontend, GuestMemfd]]:
    guest = GuestMemfd(size)
    fe = await FakeFrontend.connect(str(sock), guest)
    try:
        await fe.handshake()
        await fe.start()
        yield fe, guest
    finally:
        await fe.aclose()
        guest.close()


def populate(guest: GuestMemfd, start: int, length: int) -> None:
    os.posix_fallocate(guest.fd, start, length)  # allocates (zeroed) pages, fast


async def timed_report(fe: FakeFrontend, blocks: list[tuple[int, int]]) -> float:
    """Seconds from the kick to the call eventfd, for one report (the guest's view)."""
    ring = fe.rings[3]
    ring.add_chain([(gpa, n, True) for gpa, n in blocks])
    t0 = time.perf_counter()
    fe.kick(3)
    await fe.wait_call(3, timeout=30)
    elapsed = time.perf_counter() - t0
    ring.take_used()
    return elapsed


_HELPER = """
import os, sys, time
from vhost_user_balloon.daemon.linux.syscalls import punch_hole
fd = os.open(sys.argv[1], os.O_RDWR)
ranges = [tuple(map(int, r.split(":"))) for r in sys.argv[2:]]
for line in sys.stdin:
    t0 = time.perf_counter()
    for offset, length in ranges:
        if line.startswith("punch"):
            punch_hole(fd, offset, length)
        else:
            os.posix_fallocate(fd, offset, length)
    print(time.perf_counter() - t0, flush=True)
"""


class Helper:
    """A process of its own that fills or punches the same ranges of a guest's memfd.

    As the raw loop it is the baseline: a bare fallocate(PUNCH_HOLE) loop in another
    process than the one that allocated the pages, like the daemon. As the filler it
    plays the guest's vCPUs, which run apart from the daemon too.
    """

    def __init__(self, guest: GuestMemfd, blocks: list[tuple[int, int]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HELPER, f"/proc/{os.getpid()}/fd/{guest.fd}",
             *(f"{gpa}:{n}" for gpa, n in blocks)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, command: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def round_trips(fe: FakeFrontend, n: int) -> list[float]:
    """GET_CONFIG round trips, what a vCPU reading the balloon's config waits for."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fe.get_config()
        out.append(time.perf_counter() - t0)
        await trio.sleep(0.001)
    return out


def log_events(folder: Path, event: str) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in (folder / "log").read_text().splitlines())
    return [r for r in lines if r.get("event") == event]


@dataclass(frozen=True)
class Options:
    """The command line's options, as every benchmark's ``run`` takes them."""

    quick: bool = False
    vms: int = 64
    against: Path | None = None
