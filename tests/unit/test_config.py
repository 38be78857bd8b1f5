"""The configuration file: every key typed strictly, defaults and help from one table."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhost_user_balloon.daemon.cli import build_parser
from vhost_user_balloon.daemon.config import (
    AUTO_BALLOON,
    DEFAULT_STATS_INTERVAL_S,
    SETTINGS,
    VM,
    ConfigError,
    Settings,
    load_settings,
)


def settings(*argv: str | Path) -> Settings:
    """The settings of the daemon's command line ``argv`` (and the file it names)."""
    return load_settings(build_parser().parse_args([str(a) for a in argv]))


def load(tmp_path: Path, text: str) -> Settings:
    """A file with ``text`` at the top level and one VM."""
    conf = tmp_path / "vub.toml"
    conf.write_text(f'{text}\n[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\n')
    return settings("--config", conf)


@pytest.mark.parametrize("key", [k.key for k in SETTINGS if k.types == (bool,)])
@pytest.mark.parametrize("value", ['"false"', "0", '"no"', "[]"])
def test_a_boolean_setting_takes_only_true_or_false(tmp_path: Path, key: str, value: str) -> None:
    """``discard = "false"`` used to be taken as true (a non-empty string): for a VFIO
    guest, the difference between safe and corrupted DMA."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"{key} = {value}")
    message = str(err.value)
    assert key in message and value.strip('"') in message and "true or false" in message


def test_a_vm_tables_discard_is_a_boolean_too(tmp_path: Path) -> None:
    conf = tmp_path / "vub.toml"
    conf.write_text(f'[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\ndiscard = "false"\n')
    with pytest.raises(ConfigError, match=r"vm\[0\]: discard = 'false' is a string"):
        settings("--config", conf)
    conf.write_text(f'[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\ndiscard = false\n')
    assert settings("--config", conf).vms[0].discard is False


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("stats_interval = true", "stats_interval = True is a boolean; expected a whole number"),
        ('stats_interval = "5"', "expected a whole number or a number"),
        ("metrics_listen = 9584", "metrics_listen = 9584 is a whole number; expected a string"),
        ('allow_groups = "kvm"', "allow_groups = 'kvm' is a string; expected an array"),
        ("allow_groups = [true]", "give names or numbers"),
        ("log_level = 3", "log_level = 3 is a whole number"),
    ],
)
def test_every_wrong_type_names_key_value_and_type(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, line)
    assert words in str(err.value)


def test_right_types_and_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, "")
    assert s.stats_interval == DEFAULT_STATS_INTERVAL_S and s.access.mode == 0o600
    s = load(
        tmp_path, 'stats_interval = 2\nsocket_mode = 0o660\ndiscard = false\nlog_level = "debug"'
    )
    assert s.stats_interval == 2.0 and s.access.mode == 0o660
    assert s.vms[0].discard is False and s.log_level == "debug"
    assert load(tmp_path, 'socket_mode = "0640"').access.mode == 0o640


def test_help_lists_every_key_of_the_file() -> None:
    text = " ".join(build_parser().format_help().split())
    for key in [k.key for k in (*SETTINGS, *VM, *AUTO_BALLOON)]:
        assert key in text, key
    assert f"default {DEFAULT_STATS_INTERVAL_S:g}" in text


def test_auto_balloon_table(tmp_path: Path) -> None:
    conf = tmp_path / "vub.toml"
    conf.write_text(
        '[auto_balloon]\nbudget = "6G"\nstep = "64M"\ninterval = 5\nobserve_only = true\n'
        'max_reclaim = "1G"\n'
        f'[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\nauto_balloon = false\n'
        'min_memory = "512M"\nshares = 2000\n'
    )
    loaded = settings("--config", conf)
    auto = loaded.auto_balloon
    assert auto is not None and auto.observe_only
    assert (auto.policy.budget_bytes, auto.policy.step_bytes, auto.policy.interval_s) == (
        6 << 30, 64 << 20, 5.0)  # fmt: skip
    assert auto.policy.min_free_bytes == 128 << 20  # a default
    (vm,) = loaded.vms
    assert (vm.auto_balloon, vm.min_memory, vm.shares) == (False, 512 << 20, 2000)
    assert auto.policy.max_reclaim_bytes == 1 << 30
    # The command line's budget wins; without any budget the policy is off.
    assert (
        settings("--config", conf, "--auto-balloon-budget", "1G").auto_balloon.policy.budget_bytes
        == 1 << 30
    )  # type: ignore[union-attr]
    assert load(tmp_path, "").auto_balloon is None
    assert settings("--vm", f"a={tmp_path}/a.sock", "--auto-balloon-budget", "1G").auto_balloon


@pytest.mark.parametrize(
    ("table", "words"),
    [('budget = "6G"\nbudjet = 1', "unknown keys budjet"),
     ('budget = "lots"', 'budget = \'lots\': give bytes or a size such as "512M"'),
     ('budget = "6G"\ninterval = 0', "interval > 0"),
     ('budget = "6G"\nstep = 0', "step must be more than 0"),
     ('budget = "6G"\nmax_reclaim = "0M"', "max_reclaim must be more than 0"),
     ('budget = "6G"\nobserve_only = "yes"', "observe_only = 'yes' is a string")],
)  # fmt: skip
def test_auto_balloon_mistakes_are_named(tmp_path: Path, table: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"[auto_balloon]\n{table}")
    assert words in str(err.value)


def test_auto_balloon_options_on_the_command_line(tmp_path: Path) -> None:
    vm = ["--vm", f"a={tmp_path}/a.sock"]
    options = ["budget=2G", "step=64M", "interval=2.5", "observe_only=true"]
    auto = settings(*vm, *(a for o in options for a in ("--auto-balloon", o))).auto_balloon
    assert auto is not None and auto.observe_only
    assert (auto.policy.budget_bytes, auto.policy.step_bytes, auto.policy.interval_s) == (
        2 << 30, 64 << 20, 2.5)  # fmt: skip
    for bad, words in (("stepp=1M", "KEY one of budget"), ("interval=soon", "is a number"),
                       ("observe_only=yes", "true or false")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            settings(*vm, "--auto-balloon", bad)
        assert words in str(err.value)


@pytest.mark.parametrize(("value", "words"), [("0", "shares go from 1 to 50000"),
                                              ("60000", "auto_balloon = false"),
                                              ('"many"', "is a string")])  # fmt: skip
def test_shares_out_of_range_are_named(tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f'[[vm]]\nname = "a"\nsocket = "{tmp_path}/a.sock"\nshares = {value}\n')
    assert words in str(err.value)


def readme_toml(after_heading: str) -> str:
    """The first ```toml block of README.md after this heading, as shipped."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rest = text[text.index(after_heading) :]
    start = rest.index("```toml\n") + len("```toml\n")
    return rest[start : rest.index("```\n", start)]


def test_readme_automatic_ballooning_example_loads_as_it_says(tmp_path: Path) -> None:
    conf = tmp_path / "vub.toml"
    # as shipped, but the sockets' folder (the loader checks it exists)
    conf.write_text(readme_toml("## Automatic ballooning").replace("/run/vhost-user-balloon/",
                                                                    f"{tmp_path}/"))  # fmt: skip
    loaded = settings("--config", conf)
    auto = loaded.auto_balloon
    assert auto is not None and not auto.observe_only
    assert (auto.policy.budget_bytes, auto.policy.max_reclaim_bytes, auto.policy.step_bytes) == (
        6 << 30, 512 << 20, 128 << 20)  # fmt: skip
    assert loaded.deflate_on_oom
    vms = {vm.name: vm for vm in loaded.vms}
    assert not vms["db1"].auto_balloon and vms["web1"].shares == 2000
