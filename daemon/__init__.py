"""The vhost-user-balloon daemon: all the I/O around the sans-IO protocol package.

A folder per job; each says in its docstring what it may import, and
``tests/unit/test_layers.py`` checks it:

``serving``      one VM's connection: socket, session effects, queues, guest RAM, discard
``handover``     what a connection leaves for the next process, and adopting it again
``supervise``    the keeper process (``vhost-user-balloon supervise``) and its standby
``observing``    metrics, the totals carried across restarts, ``/metrics``, problems
``linux``        system calls, fds over sockets, peer credentials, systemd, logging
``autoballoon``  the automatic balloon policy's runner and the host's memory readers
``commands``     what operators run: status, balloon, migrate-prepare/-finish, reclaim

``config`` holds every setting (file, command line, ``--help``). The top level puts it
together and nothing imports it: ``server`` (the ``Daemon``), ``control`` (the control
socket) and ``cli`` (the daemon's command). This package re-exports nothing, so that
importing one part never imports the rest.
"""
