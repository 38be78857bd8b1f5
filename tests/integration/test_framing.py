"""The frontend socket's checks that do not wait (is something unread, is this
message still at the head) work whatever the fd's number: a daemon serving many VMs
has fds from 1024 up (the service allows 16384), which select() cannot take."""

from __future__ import annotations

import fcntl
import resource
import socket

import trio

from vhost_user_balloon.daemon.serving.framing import FrontendStream

HIGH_FD = 1500


async def test_a_frontend_socket_past_fd_1024_is_looked_at_without_waiting() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= HIGH_FD:  # root on the CI machine: the hard limit is well above
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH_FD + 1, hard))
    ours, qemus = socket.socketpair()
    high = fcntl.fcntl(ours.fileno(), fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    ours.close()
    stream = FrontendStream(trio.socket.from_stdlib_socket(socket.socket(fileno=high)))
    try:
        assert stream.fileno() >= 1024
        assert not stream.has_unread()
        assert not await stream.at_head(b"abc")
        qemus.send(b"abcdef")
        assert stream.has_unread()
        assert await stream.at_head(b"abc")
        assert not await stream.at_head(b"xyz")
    finally:
        stream.close()
        qemus.close()
