"""Real QEMU, real Debian guest kernels. Provisioned by testbed/provision; never skipped:
if the environment is missing, the tests fail and say what to run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.guestrun import Env


@pytest.fixture(scope="session")
def env() -> Env:
    return Env.load()


@pytest.fixture
def rundir(env: Env) -> Iterator[Path]:
    path = env.run_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # marked before -m selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
