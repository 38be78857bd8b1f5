"""The simulation's baselines (benchmarks/policy_sim.py) do what the rules they stand
for do: Proxmox's pvestatd and oVirt MOM's balloon rules, on small hand-made fleets."""

from __future__ import annotations

from benchmarks.policy_sim import KERNEL, Vm, main, mom, proxmox

MiB = 1 << 20
GiB = 1 << 30


def vm(name: str, ram: int, anon: int, cache: int, balloon: int = 0) -> Vm:
    return Vm(name, "idle", ram, 0.0, anon=anon, cache=cache, balloon=balloon, target=balloon)


def test_proxmox_takes_at_most_100_mib_per_vm_and_first_from_vms_with_enough_free() -> None:
    roomy = vm("roomy", 4 * GiB, anon=GiB, cache=GiB)  # 1.9 GiB free > 1/4 of its 2 GiB min
    tight = vm("tight", 4 * GiB, anon=3 * GiB, cache=800 * MiB)  # ~160 MiB free
    fleet = [roomy, tight]
    budget = sum(v.resident for v in fleet) - GiB  # 1 GiB over
    proxmox(budget)(fleet, 0.0)
    assert roomy.target == 100 * MiB  # the most one round moves a VM
    assert tight.target == 0  # the VMs with enough free gave what they could first


def test_proxmox_gives_back_toward_the_goal_and_ignores_small_goals() -> None:
    a = vm("a", 4 * GiB, anon=GiB, cache=0, balloon=GiB)
    fleet = [a]
    proxmox(a.resident + 5 * MiB)(fleet, 0.0)  # within 10 MiB: nothing
    assert a.target == GiB
    proxmox(a.resident + GiB)(fleet, 0.0)
    assert a.target == GiB - 100 * MiB


def test_mom_shrinks_5_percent_under_pressure_and_grows_5_percent_without() -> None:
    a = vm("a", 4 * GiB, anon=GiB, cache=2 * GiB)  # free ~0.9 GiB, used ~3 GiB
    budget = int(a.resident * 0.9)  # host free under 20%: pressure
    mom(budget)([a], 0.0)
    assert a.target == 4 * GiB - int(4 * GiB * 0.95)
    # no pressure, ballooned: grows 5% of its current memory, or to what it uses
    # plus 20% of its maximum if that is more
    b = vm("b", 4 * GiB, anon=GiB, cache=0, balloon=2 * GiB)
    mom(10 * b.resident)([b], 0.0)
    used = 2 * GiB - b.free
    assert b.target == 4 * GiB - int(max(2 * GiB * 1.05, used + 0.2 * 4 * GiB))
    assert b.free == 2 * GiB - KERNEL - GiB


def test_mom_decides_every_15_seconds() -> None:
    a = vm("a", 4 * GiB, anon=GiB, cache=2 * GiB)
    decide = mom(int(a.resident * 0.9))
    decide([a], 0.0)
    first = a.balloon = a.target  # the guest does as told
    decide([a], 10.0)  # same 15 s round: nothing
    assert a.target == first
    decide([a], 20.0)
    assert a.target > first


def test_the_whole_simulation_runs_and_checks_its_targets(capsys: object) -> None:
    assert main(["--vms", "8", "--hours", "0.1", "--seeds", "1"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "targets for 'after'" in out
    for rule in ("after", "proxmox", "mom"):
        assert f" {rule} " in out
