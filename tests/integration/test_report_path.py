"""One free page report reads top to bottom: the calls it makes between the package's
files are few (README "How it is built" lists them), and this test keeps them so.

A profiler hook (in the event loop's thread and in the discard threads) records every
call into a module of the package whose nearest caller in the package is in another
file, from the guest's kick to the call eventfd, for a report served once the queue is
running (the first one also resolves the ring's areas).
"""

from __future__ import annotations

import dis
import functools
import inspect
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import trio

import vhost_user_balloon
from tests.daemon_helpers import StartDaemon, attach
from tests.frontend import FakeFrontend, GuestMemfd, MiB

#: The most calls between files one report may make (the issue's target: 15).
MOST_CALLS = 15
#: Where the package's code is (protocol/, policy/ and daemon/ are linked into it).
_PACKAGE = Path(vhost_user_balloon.__file__).parent
_FOLDERS = (*(str(p.resolve()) for p in _PACKAGE.iterdir() if p.is_dir()), str(_PACKAGE.resolve()))


def _ours(frame: FrameType) -> str | None:
    """The frame's file relative to the package (``daemon/serving/queues.py``), or None
    if it is not the package's code."""
    name = str(Path(frame.f_code.co_filename).resolve())
    for folder in _FOLDERS:
        if name.startswith(folder + "/"):
            root = Path(vhost_user_balloon.__file__).parent.parent.resolve()
            return str(Path(name).relative_to(root))
    return None


@functools.cache
def _start(code: CodeType) -> int:
    """Where a coroutine's frame stands when it is first entered (its first RESUME)."""
    return next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")


@contextmanager
def cross_file_calls() -> Iterator[list[str]]:
    """``caller_file:function -> callee_file:function`` for every call between two
    files of the package, in every thread, while the block runs."""
    crossings: list[str] = []
    recording = True

    def hook(frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call" or not recording:
            return
        if frame.f_code.co_flags & inspect.CO_COROUTINE and frame.f_lasti > _start(frame.f_code):
            return  # a coroutine going on after an await: no new call
        callee = _ours(frame)
        if callee is None:
            return
        caller = frame.f_back
        while caller is not None and _ours(caller) is None:
            caller = caller.f_back
        if caller is not None and _ours(caller) != callee:
            crossings.append(
                f"{_ours(caller)}:{caller.f_code.co_name} -> {callee}:{frame.f_code.co_name}"
            )

    sys.setprofile(hook)
    threading.setprofile(hook)
    try:
        yield crossings
    finally:
        recording = False
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


async def test_a_report_crosses_few_files(
    start_daemon: StartDaemon, guests: list[GuestMemfd], frontends: list[FakeFrontend]
) -> None:
    # The discard threads start with the first report: the hook must be set before.
    with cross_file_calls() as crossings:
        daemon = await start_daemon("vm")
        guest = GuestMemfd(128 * MiB)
        guests.append(guest)
        fe = await attach(str(daemon.vms[0].socket), guest, frontends)
        blocks = [(64 * MiB + i * 2 * MiB, 2 * MiB) for i in range(32)]
        await fe.report(3, blocks)  # the first: the ring's areas are resolved
        await trio.sleep(0.2)  # the guest has its report back: the thread ends its turn
        start = len(crossings)
        await fe.report(3, blocks)
        await trio.sleep(0.2)
        path = crossings[start:]
    print("\n".join(f"{i:2}. {c}" for i, c in enumerate(path, 1)))
    assert len(path) <= MOST_CALLS, "\n".join(path)
    # ... and it is the report path: walk, entries, gate, punch, hand back, count.
    steps = ("virtqueue.py:pop", "balloon.py:report_ranges", "discard.py:give_back",
             "syscalls.py:punch_holes", "virtqueue.py:complete",
             "metrics.py:record_report")  # fmt: skip
    for step in steps:
        assert any(c.endswith(step) for c in path), (step, path)
