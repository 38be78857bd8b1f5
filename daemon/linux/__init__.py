"""Linux plumbing: the system calls the standard library lacks (``syscalls``, built by
cffi from ``_syscalls_build``), file descriptors passed over unix sockets (``fds``),
the peer of a unix socket (``peer``), the two systemd protocols (``systemd``) and the
logging set-up (``logs``). The bottom layer: it imports no other part of the daemon,
and never trio.
"""
