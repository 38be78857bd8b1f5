"""Thin, checked wrappers over the cffi syscalls: raise ``OSError`` with context."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ._syscalls import ffi, lib  # type: ignore[import-not-found]

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "peer_groups",
    "punch_hole",
    "punch_holes",
    "same_open_file",
]

#: Supplementary groups a process can have (NGROUPS_MAX on Linux).
_NGROUPS_MAX = 65536

FALLOC_FL_KEEP_SIZE: int = lib.FALLOC_FL_KEEP_SIZE
FALLOC_FL_PUNCH_HOLE: int = lib.FALLOC_FL_PUNCH_HOLE


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes at ``offset`` of ``fd``; the file keeps its size.

    This is what gives shared guest RAM back to the host: on a memfd or hugetlbfs
    file the pages are released and later reads see zeros. (MADV_DONTNEED on a
    MAP_SHARED mapping frees nothing: docs/facts.md section 3.) cffi releases the GIL
    around the call, so it may run in a worker thread.
    """
    if lib.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ffi.errno
        raise OSError(
            err,
            f"fallocate(PUNCH_HOLE) of {length:#x} bytes at {offset:#x} on fd {fd}: "
            f"{os.strerror(err)}",
        )


def punch_holes(holes: Sequence[Sequence[int]]) -> list[tuple[int, OSError]]:
    """``punch_hole`` for each (fd, offset, length, ...), in order; the ones that
    failed, by index, with why (one failure does not stop the others)."""
    failed = []
    for index, hole in enumerate(holes):
        try:
            punch_hole(hole[0], hole[1], hole[2])
        except OSError as err:
            failed.append((index, err))
    return failed


def same_open_file(fd1: int, fd2: int) -> bool:
    """Whether two fds are one open file description (kcmp(2) KCMP_FILE), as when a
    peer sends one fd twice. Raises ``OSError`` if the kernel will not say."""
    result = lib.vub_same_file(fd1, fd2)
    if result < 0:
        err = ffi.errno
        raise OSError(err, f"kcmp(KCMP_FILE) of fds {fd1} and {fd2}: {os.strerror(err)}")
    return bool(result == 0)


def peer_groups(fd: int) -> tuple[int, ...]:
    """The supplementary groups of the process at the other end of a unix socket, as
    they were when it connected (SO_PEERGROUPS). Raises ``OSError`` if the kernel will
    not say."""
    groups = ffi.new("unsigned int[]", _NGROUPS_MAX)
    count = lib.vub_peer_groups(fd, groups, _NGROUPS_MAX)
    if count < 0:
        err = ffi.errno
        raise OSError(err, f"getsockopt(SO_PEERGROUPS) on fd {fd}: {os.strerror(err)}")
    return tuple(groups[i] for i in range(count))
