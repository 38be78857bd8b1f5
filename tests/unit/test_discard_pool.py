"""The threads that punch holes: results and errors come back, at most ``threads`` jobs
run at once, a caller that is cancelled still waits for its job, and closing the pool
ends its threads."""

from __future__ import annotations

import contextvars
import os
import threading

import pytest
import trio

from vhost_user_balloon.daemon.serving.discard import DiscardPool

pytestmark = pytest.mark.trio


async def test_results_and_errors_come_back_from_the_threads() -> None:
    pool = DiscardPool(2)
    assert await pool.run(threading.get_ident) != threading.get_ident()

    def fails() -> None:
        raise OSError(28, "no space")

    with pytest.raises(OSError, match="no space"):
        await pool.run(fails)
    assert await pool.run(lambda: 42) == 42  # the thread went on after the error


async def test_no_more_jobs_run_at_once_than_threads() -> None:
    pool = DiscardPool(2)
    release = threading.Event()
    running, most = 0, 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(pool.run, job)
        await trio.sleep(0.2)
        assert running == 2
        release.set()
    assert most == 2


async def test_a_cancelled_caller_still_waits_for_its_job() -> None:
    pool = DiscardPool(1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(5)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, job)
        await trio.to_thread.run_sync(started.wait, 5)
        threading.Timer(0.3, release.set).start()
        nursery.cancel_scope.cancel()  # the nursery ends only when run() returns
    assert finished.is_set()  # so run() returned only after the job ended


async def test_eventfds_are_kept_for_the_next_caller_not_made_anew() -> None:
    """One eventfd per caller at once, reused after: none made per job, none leaked."""
    pool = DiscardPool(2)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        await pool.run(int)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(pool.run, lambda: threading.Event().wait(0.05))
    assert len(os.listdir("/proc/self/fd")) == before + 3


async def test_a_job_runs_in_its_callers_context() -> None:
    """Log lines written in the thread carry the caller's bound fields (its vm=)."""
    pool = DiscardPool(2)
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("web1")
    assert await pool.run(var.get) == "web1"


def discard_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("vub-discard-")}


async def test_close_ends_the_threads_and_a_later_run_starts_them_again() -> None:
    pool = DiscardPool(3)
    before = discard_threads()
    await pool.run(lambda: None)
    mine = discard_threads() - before
    assert len(mine) == 3
    pool.close()
    for thread in mine:
        thread.join(5)
    assert not any(t.is_alive() for t in mine)
    assert await pool.run(lambda: 7) == 7  # a daemon restarted in this process
    pool.close()
