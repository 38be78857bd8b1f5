"""Churn with a real guest at the default reporting order: what the daemon's churn
counters say came back, beside what the test reads of the guest RAM file itself.

A 1 GiB Debian 6.12 guest runs the test bed's mixed workload (64 tmpfs files rewritten
with sizes of 64 KiB to 4 MiB, a disk read and the page cache dropped every 50 files)
for 90 s, idles 70 s, then allocates 256 MiB once, frees it and idles 70 s again.
While the mixed workload runs, the guest keeps taking back memory it reported: the
RAM file's allocated size stays up while reports keep punching it. The file counts
every page taken again, whenever it was given back (most of it at boot, minutes
before); the churn counters count a sampled block only if it was in use again 10 s or
60 s after it was given back. So the counters are non-zero and at most what the file
says. After the single free, the guest takes nothing back: the file stays down, and
the counters of that phase say so too.
"""

from __future__ import annotations

from pathlib import Path

from testbed.guestrun import Env, GuestRun, GuestSpec, MiB, Sample, run_guest

DISCARDED = "vhost_user_balloon_discarded_bytes_total"
CHECKED = "vhost_user_balloon_churn_checked_bytes_total"
RESIDENT = "vhost_user_balloon_churn_resident_bytes_total"


def at(run: GuestRun, marker: str, after: float = 0.0) -> Sample:
    """The first sample with metrics taken ``after`` seconds or more past ``marker``."""
    t = run.marker(marker) + after
    found = [s for s in run.samples if s.t >= t and s.metrics]
    assert found, f"no sample {after} s after {marker!r}: {sorted(run.markers)}"
    return found[0]


def churn(a: Sample, b: Sample, window: str) -> tuple[float, float]:
    """Bytes checked and found taken again at the end of ``window``, from a to b."""
    checked = b.metrics.total(CHECKED, window=window) - a.metrics.total(CHECKED, window=window)
    again = b.metrics.total(RESIDENT, window=window) - a.metrics.total(RESIDENT, window=window)
    return checked, again


def test_churn_counters_agree_with_the_guest_ram_file(env: Env, rundir: Path) -> None:
    disk = rundir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1024 * MiB)
    spec = GuestSpec(
        kernel="6.12", mem_mib=1024, workload_mib=256, rounds=1, settle_s=70, idle_s=3,
        append="vub.mixed=90",
        qemu_extra=("-drive", f"file={env.inside(disk)},if=virtio,format=raw,readonly=on"),
        timeout_s=600,
    )  # fmt: skip

    def over(r: GuestRun) -> bool:  # a minute after the single free (the guest idles 70 s)
        freed = r.markers.get("freed round=1")
        return freed is not None and any(s.t >= freed + 60 and s.metrics for s in r.samples)

    run = run_guest(spec, env, stop_when=over)
    assert over(run), run.console[-10:]

    # The mixed workload: from 30 s in (the guest's free memory reported by then) to its end.
    start, end = at(run, "mixed start", 30), at(run, "mixed done")
    given = end.metrics.total(DISCARDED) - start.metrics.total(DISCARDED)
    dropped = start.memfd_bytes - end.memfd_bytes
    back = given - dropped  # punched, yet the file did not shrink by it: taken again
    shares = {}
    for window in ("10s", "60s"):
        checked, again = churn(at(run, "mixed start"), at(run, "ready"), window)
        assert checked > 0, window
        shares[window] = again / checked
    print(
        f"\nmixed: {given / MiB:.0f} MiB given back in {end.t - start.t:.0f} s, the RAM file "
        f"{start.memfd_bytes / MiB:.0f} -> {end.memfd_bytes / MiB:.0f} MiB: "
        f"{back / MiB:.0f} MiB taken again ({back / given:.0%}); churn counters: "
        f"{shares['10s']:.1%} taken again within 10 s, {shares['60s']:.1%} within 60 s"
    )
    # (how much depends on the guest's speed: 52-290 MiB a minute measured under TCG)
    assert given > 16 * MiB and back > given / 4, (given, back)
    assert shares["10s"] > 0, shares
    assert max(shares.values()) <= back / given + 0.05, (shares, back / given)

    # One free, then idle: nothing comes back, by the file and by the counters.
    freed, settled = at(run, "freed round=1", 15), at(run, "freed round=1", 60)
    checked, again = churn(at(run, "ready"), settled, "10s")
    print(
        f"single free: the RAM file {freed.memfd_bytes / MiB:.0f} -> "
        f"{settled.memfd_bytes / MiB:.0f} MiB over the idle minute; churn counters 10 s: "
        f"{again / MiB:.1f} of {checked / MiB:.1f} MiB checked"
    )
    assert settled.memfd_bytes - freed.memfd_bytes < 32 * MiB
    assert checked > 0 and again <= checked * 0.1, (checked, again)
