"""Real QEMU, real Debian guest kernels. Provisioned by qemu-config/provision; never skipped:
if the environment is missing, the tests fail and say what to run."""

from __future__ import annotations

import pytest
from guestrun import Env


@pytest.fixture(scope="session")
def env() -> Env:
    return Env.load()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
