"""protocol/ and policy/ are sans-IO and standard-library only: reusable anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_user_balloon import policy, protocol

PROTOCOL_DIR = Path(protocol.__file__).parent
POLICY_DIR = Path(policy.__file__).parent
FORBIDDEN = {
    "trio",
    "structlog",
    "prometheus_client",
    "cffi",
    "socket",
    "mmap",
    "select",
    "time",
    "datetime",
}  # no clock: time comes in as numbers


#: Beside FORBIDDEN, for protocol/ alone: it is handed bytes and numbers, it never
#: starts threads or processes or touches files (policy/ is pure by the same rule).
FORBIDDEN_IN_PROTOCOL = {"threading", "os", "subprocess"}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [(PROTOCOL_DIR, FORBIDDEN | FORBIDDEN_IN_PROTOCOL), (POLICY_DIR, FORBIDDEN)],
    ids=["protocol", "policy"],
)
def test_imports_only_the_standard_library(folder: Path, forbidden: set[str]) -> None:
    offenders = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names or top in forbidden:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


@pytest.mark.parametrize("package", ["protocol", "policy"])
def test_importing_it_pulls_in_no_io_library(package: str) -> None:
    code = (
        f"import sys, vhost_user_balloon.{package}\n"
        f"bad = sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # socket/select may be imported by the interpreter itself; the libraries must not be.
    loaded = set(filter(None, out.stdout.strip().split(",")))
    assert loaded & {"trio", "structlog", "prometheus_client", "cffi"} == set()


def test_public_names_are_exported_once() -> None:
    assert len(protocol.__all__) == len(set(protocol.__all__))
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
