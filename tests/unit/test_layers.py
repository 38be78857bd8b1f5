"""The import rules between the parts of the package (README "How it is built").

Each part may import the parts its row names, and nothing else of the package; the
standard library and third-party libraries are checked apart (``FORBIDDEN_LIBRARIES``,
and test_purity.py for protocol/ and policy/). A rule broken on purpose fails with the
module, the line and the import that broke it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhost_user_balloon

PACKAGE = "vhost_user_balloon"
ROOT = Path(vhost_user_balloon.__file__).parent
#: The daemon's top level: it puts the parts together, and nothing imports it.
TOP = {"daemon", "daemon.server", "daemon.listening", "daemon.cli", "daemon.control", "__main__"}
#: What each part may import of the package (besides itself and the root's __version__).
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "policy": set(),
    "daemon.linux": set(),
    "daemon.observing": {"protocol", "daemon.linux"},
    "daemon.handover": {"protocol", "daemon.linux"},
    "daemon.supervise": {"daemon.linux"},
    "daemon.serving": {"protocol", "daemon.linux", "daemon.observing", "daemon.handover"},
    "daemon.config": {"policy"},
    "daemon.autoballoon": {
        "policy",
        "protocol",
        "daemon.config",
        "daemon.observing",
        "daemon.serving",
    },
    "daemon.commands": {"protocol", "daemon.config", "daemon.observing"},
}
#: Libraries a part must not import, with the reason.
FORBIDDEN_LIBRARIES: dict[str, dict[str, str]] = {
    "daemon.linux": {"trio": "the bottom layer is also the keeper's, which has no event loop"},
    "daemon.supervise": {
        "trio": "the keeper has no event loop",
        "prometheus_client": "the keeper exports nothing",
    },
    "daemon.commands": {"trio": "operators' commands are blocking code that starts fast"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. daemon.serving.queues
    line: int
    target: str  # what it imports, relative to the package, e.g. daemon.config


def part_of(module: str) -> str:
    """The part a module belongs to: its row in ALLOWED, or a TOP module."""
    if module in TOP or module in ALLOWED:
        return module
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module.startswith(part + "."):
            return part
    raise AssertionError(f"{module} belongs to no part: add it to ALLOWED or TOP")


def modules() -> dict[str, Path]:
    """Every module of the package, by name (protocol/, policy/ and daemon/ are
    linked into the package folder: walked by hand, as rglob does not follow links)."""
    paths = []
    for folder, _, files in os.walk(ROOT, followlinks=True):
        paths += [Path(folder) / f for f in files if f.endswith(".py")]
    found = {}
    for path in sorted(paths):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            found[".".join(parts)] = path
    return found


def imports(module: str, path: Path) -> list[Import]:
    """Every import of the package in ``module``, resolved to a module name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, *([node.module] if node.module else [])])
                targets = [f"{PACKAGE}.{stem}" if stem else PACKAGE]
                if node.module is None:  # from . import a, b
                    targets = [f"{PACKAGE}.{'.'.join([*base, a.name])}" for a in node.names]
            elif node.module:
                targets = [node.module]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                out.append(Import(module, node.lineno, target[len(PACKAGE) + 1 :]))
    return out


def broken_rules(found: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in found.items():
        part = part_of(module)
        if part in TOP:  # the top level may import anything
            continue
        for imp in imports(module, path):
            if imp.target == "":  # the root: __version__
                continue
            other = part_of(imp.target)
            if other == part:
                continue
            if other in TOP:
                problems.append(f"{module}:{imp.line} imports {imp.target}: nothing imports "
                                "the top level")  # fmt: skip
            elif other not in ALLOWED[part]:
                problems.append(
                    f"{module}:{imp.line} imports {imp.target}: {part} may import only "
                    f"{', '.join(sorted(ALLOWED[part])) or 'itself'}"
                )
    return problems


def test_every_part_imports_only_what_its_rule_allows() -> None:
    assert broken_rules(modules()) == []


def test_a_broken_rule_is_named(tmp_path: Path) -> None:
    """The check itself: a serving module that imports the settings is caught."""
    bad = tmp_path / "queues.py"
    bad.write_text("from ..config import Settings\n")
    assert broken_rules({"daemon.serving.queues": bad}) == [
        "daemon.serving.queues:1 imports daemon.config: daemon.serving may import only "
        "daemon.handover, daemon.linux, daemon.observing, protocol"
    ]


@pytest.mark.parametrize("part", sorted(FORBIDDEN_LIBRARIES))
def test_forbidden_libraries_stay_out(part: str) -> None:
    offenders = []
    for module, path in modules().items():
        if part_of(module) != part:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                why = FORBIDDEN_LIBRARIES[part].get(name.split(".")[0])
                if why is not None:
                    offenders.append(f"{module}:{node.lineno} imports {name}: {why}")
    assert offenders == []


#: Each operator's command, run as users run it: what it must not pull in.
COMMANDS = ["status", "balloon", "migrate-prepare", "migrate-finish", "reclaim", "supervise"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_starts_without_the_daemon(command: str) -> None:
    """Run as ``vhost-user-balloon COMMAND --help``: neither trio nor the daemon's
    serving code, server or observing endpoint is imported."""
    code = (
        "import sys; from vhost_user_balloon.__main__ import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "usage" in done.stdout.lower() or command == "supervise"
    heavy = {m for m in loaded if m == "trio" or m.startswith(f"{PACKAGE}.daemon.serving")}
    heavy |= loaded & {f"{PACKAGE}.daemon.server", f"{PACKAGE}.daemon.cli"}
    assert heavy == set()


def test_supervise_starts_without_importing_the_daemon() -> None:
    """The supervisor imports its few helpers only (a restart under systemd starts it
    and then the daemon: each import it spares shortens that gap)."""
    code = (
        "import sys; from vhost_user_balloon.__main__ import main; "
        "sys.argv = ['vhost-user-balloon', 'supervise', '--help']; main(); "
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "vhost_user_balloon.daemon.supervise.supervisor" in loaded
    heavy = {"trio", "prometheus_client", "cffi", "vhost_user_balloon.daemon.server",
             "vhost_user_balloon.protocol"}  # fmt: skip
    assert not heavy & loaded, heavy & loaded
