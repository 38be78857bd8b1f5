"""cffi build script (out-of-line API mode) for the few syscalls the stdlib lacks.

The C compiler checks each signature and fills in each constant from the system
headers, so nothing here is a guessed number. Built by setuptools through
``cffi_modules`` in setup.py.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    typedef int... off_t;
    int fallocate(int fd, int mode, off_t offset, off_t len);
    #define FALLOC_FL_KEEP_SIZE ...
    #define FALLOC_FL_PUNCH_HOLE ...
    int vub_same_file(int fd1, int fd2);
    int vub_peer_groups(int fd, unsigned int *groups, int max);
    """
)
ffibuilder.set_source(
    "vhost_user_balloon.daemon.linux._syscalls",
    """
    #define _GNU_SOURCE
    #include <fcntl.h>
    #include <linux/falloc.h>
    #include <linux/kcmp.h>
    #include <sys/socket.h>
    #include <sys/syscall.h>
    #include <unistd.h>

    /* kcmp(2) KCMP_FILE: 0 if both fds refer to one open file description, 1 or 2 if
       not, -1 with errno if the kernel cannot tell (no CONFIG_KCMP, seccomp). */
    static int vub_same_file(int fd1, int fd2)
    {
        pid_t pid = getpid();
        return (int)syscall(SYS_kcmp, pid, pid, KCMP_FILE, fd1, fd2);
    }

    /* getsockopt SO_PEERGROUPS (socket(7)): the supplementary groups of the process
       that connected, as they were at connect(). The number of groups, or -1 with
       errno (ERANGE: more than max). */
    static int vub_peer_groups(int fd, unsigned int *groups, int max)
    {
        socklen_t len = (socklen_t)(max * sizeof(*groups));
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) != 0)
            return -1;
        return (int)(len / sizeof(*groups));
    }
    """,
)

if __name__ == "__main__":  # pragma: no cover - manual builds
    ffibuilder.compile(verbose=True)
