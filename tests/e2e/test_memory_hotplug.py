"""Guest memory that comes and goes while the guest runs: virtio-mem and a DIMM.

A Debian 6.12 guest boots with 1 GiB and a virtio-mem device (qemu-config/
virtio-mem.args, dynamic-memslots=on, 1 GiB plugged at start) beside the balloon. Its
first 700 MiB round lands in the plugged memory (online_movable: the zone the page
allocator tries first), which must come back through free page reporting. Then the
host unplugs it (qom-set requested-size 0), plugs a 512 MiB DIMM for the second round
and unplugs that too (device_del). Each plug is an ADD_MEM_REG, each unplug a
REM_MEM_REG, and after each removal the daemon must no longer map that memory.
Host memory is measured from the outside: each backend memfd's allocated blocks,
read through QEMU's fds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testbed.guestrun import Env, GuestSpec, MiB, attach_args, qemu_memfd, stop_process
from tests.daemon_helpers import Logs
from tests.e2e_helpers import Console, start_guest, wait
from vhost_user_balloon.daemon.commands.qmp import Qmp

GiB = 1024 * MiB
#: A round is 700 MiB; what stays of it after the free must be under this.
LEFT = 64 * MiB


def backing(qemu: int, size: int) -> tuple[str, int]:
    """QEMU's fd of the memory backend of this size: its /proc path and inode."""
    path = qemu_memfd(qemu, size)
    assert path is not None, f"QEMU {qemu} has no memfd of {size / MiB:.0f} MiB"
    return path, os.stat(path).st_ino


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def mapped(pid: int, inode: int) -> bool:
    """Whether process ``pid`` maps any part of the file with this inode."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return any(len(f := line.split()) > 5 and f[4] == str(inode) for line in lines)


def round_comes_back(guest: Console, n: int, path: str) -> tuple[int, int, float]:
    """Round ``n``'s peak in this backend, what is left of it, and how long that took."""
    guest.wait(f"allocated round={n}", 90)
    peak = allocated(path)
    freed = guest.wait(f"freed round={n}", 30)
    wait(f"round {n} back from {path}", lambda: allocated(path) <= LEFT, 60)
    return peak, allocated(path), time.monotonic() - freed


def test_virtio_mem_and_a_dimm_come_and_go_under_a_running_guest(env: Env, rundir: Path) -> None:
    sock, qmp_sock = rundir / "vm.sock", rundir / "qmp.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhost_user_balloon", "--log-format=json",
         "--metrics-listen=127.0.0.1:0", f"--vm=vm={sock}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = Logs(daemon)
    qemus: list[subprocess.Popen[bytes]] = []
    try:
        log.wait_for("daemon_ready")
        spec = GuestSpec(
            kernel="6.12", mem_mib=1024, hotplug="slots=2,maxmem=4G", workload_mib=700,
            rounds=2, settle_s=40, append="memhp_default_state=online_movable vub.plugged=1900",
        )  # fmt: skip
        attach = [
            *attach_args("vhost-user-balloon", socket=env.inside(sock), mem="1G"),
            *attach_args("virtio-mem", size="2G", requested="1G"),
            "-qmp", f"unix:{env.inside(qmp_sock)},server=on,wait=off",
        ]  # fmt: skip
        guest = start_guest(env, spec, attach, qemus)
        guest.wait("plugged", 90)
        qemu = qemus[0].pid
        vmem, vmem_inode = backing(qemu, 2 * GiB)
        # Boot RAM and the one plugged memslot, each its own region.
        log.wait_for("memory_region_added", gpa=4 * GiB, size=GiB, timeout=5)
        assert mapped(daemon.pid, vmem_inode)

        # 1. Memory the guest frees in the plugged memory comes back.
        peak, left, secs = round_comes_back(guest, 1, vmem)
        print(f"\nvirtio-mem: {peak / MiB:.0f} MiB -> {left / MiB:.0f} MiB in {secs:.1f} s")
        assert peak >= 500 * MiB, peak / MiB  # the round really used the plugged memory

        # 2. Unplugged: the region is removed and the daemon lets go of its mapping.
        qmp = Qmp(str(qmp_sock))
        qmp.command("qom-set", path="vmem0-dev", property="requested-size", value=0)
        log.wait_for("memory_region_removed", gpa=4 * GiB, size=GiB, timeout=30)
        assert not mapped(daemon.pid, vmem_inode)

        # 3. A DIMM plugged before the second round: its memory comes back too.
        qmp.command(
            "object-add", **{"qom-type": "memory-backend-memfd", "id": "dimm0-mem",
                             "size": 512 * MiB, "share": True},
        )  # fmt: skip
        qmp.command("device_add", driver="pc-dimm", id="dimm0", memdev="dimm0-mem")
        added = log.wait_for("memory_region_added", size=512 * MiB, timeout=30)
        plugged_at = time.monotonic()
        dimm, dimm_inode = backing(qemu, 512 * MiB)
        assert mapped(daemon.pid, dimm_inode)
        assert guest.wait("alloc round=2", 60) > plugged_at, "round 2 began before the plug"
        peak, left, secs = round_comes_back(guest, 2, dimm)
        print(f"DIMM: {peak / MiB:.0f} MiB -> {left / MiB:.0f} MiB in {secs:.1f} s")
        assert peak >= 300 * MiB, peak / MiB

        # 4. The DIMM unplugged (the guest offlines and ejects it).
        qmp.command("device_del", id="dimm0")
        assert qmp.wait_event("DEVICE_DELETED", 60, lambda d: d.get("device") == "dimm0")
        log.wait_for("memory_region_removed", gpa=added["gpa"], timeout=30)
        assert not mapped(daemon.pid, dimm_inode)

        # Nothing else happened to the connection or to QEMU.
        assert qemus[0].poll() is None and guest.stderr == []
        problems = [r for r in log.lines if r["level"] in ("warning", "error")]
        assert problems == [], problems
        qmp.close()
    finally:
        for q in qemus:
            stop_process(q, signal.SIGKILL, 5)
        stop_process(daemon, signal.SIGTERM, 10)
